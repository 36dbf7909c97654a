"""Learning-rate schedules, optimizer groups, FLOP convention, loss normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from scaletrain.config import load_config, resolve_model
from scaletrain.config.schema import ModelConfig, OptimConfig
from scaletrain.distributed import ParallelDims
from scaletrain.models import build_model
from scaletrain.parallel.schedules import forward_backward_no_pipelining
from scaletrain.stages.pretrain.objective import LanguageModelingObjective
from scaletrain.trainer.flops import device_peak_tflops, flops_per_token, parameter_counts
from scaletrain.trainer.lr_schedule import lr_at
from scaletrain.trainer.optimizer import param_groups

from conftest import REPO

pytestmark = pytest.mark.unit


def test_cosine_with_warmup_hand_values():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    mid = 10 + 99 / 2
    assert lr_at(int(mid), cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert lr_at(109, cfg, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("shape,expected_mid", [("linear", 0.55), ("cosine", 0.55), ("1-sqrt", None)])
def test_wsd(shape, expected_mid):
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=0, schedule="wsd", decay_fraction=0.2, wsd_decay_shape=shape)
    assert lr_at(0, cfg, 100) == 1.0 and lr_at(79, cfg, 100) == 1.0
    assert lr_at(99, cfg, 100) == pytest.approx(0.1)
    if expected_mid is not None:
        assert lr_at(89, cfg, 100) == pytest.approx(expected_mid)
    else:
        assert lr_at(89, cfg, 100) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))


def test_no_weight_decay_on_norms_and_biases():
    cfg = resolve_model(ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=32,
                                    qkv_bias=True), tokenizer_vocab=None, tp=1, seq_length=8)
    model = build_model(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"weight", "bias"}
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_flops_convention_on_published_shape():
    cfg = load_config(REPO / "configs" / "llama3_8b.toml").model
    cfg = resolve_model(cfg, tokenizer_vocab=None, tp=1, seq_length=8192)
    assert parameter_counts(cfg)["total"] == 8_030_261_248  # Llama-3.1-8B's published count
    assert flops_per_token(cfg, 8192) / 1e9 == pytest.approx(57.9, abs=0.05)
    assert flops_per_token(cfg, 8192, causal_halved=True) / 1e9 == pytest.approx(51.5, abs=0.05)
    cfg1b = resolve_model(load_config(REPO / "configs" / "llama3_1b.toml").model, tokenizer_vocab=None, tp=1,
                          seq_length=8192)
    assert parameter_counts(cfg1b)["total"] == 1_235_814_400  # Llama-3.2-1B (tied)


def test_parameter_count_matches_the_built_model():
    cfg = resolve_model(ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                                    ffn_hidden_size=32, qkv_bias=True), tokenizer_vocab=None, tp=1, seq_length=8)
    model = build_model(cfg)
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_device_peaks():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert device_peak_tflops("NVIDIA H200", "fp8") == 1979.0
    assert device_peak_tflops("cpu", "bfloat16") is None


def test_loss_is_normalised_by_global_valid_tokens():
    """Two microbatches with different valid-token counts: the result is the global token mean."""
    torch.manual_seed(0)
    logits = [torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    labels = [torch.randint(0, 8, (1, 4)) for _ in range(2)]
    masks = [torch.tensor([[1, 1, 1, 0]]), torch.tensor([[1, 0, 0, 0]])]
    batches = [{"tokens": torch.zeros(1, 4, dtype=torch.long), "labels": lb, "loss_mask": mk, "i": torch.tensor(i)}
               for i, (lb, mk) in enumerate(zip(labels, masks))]

    class Fixed(torch.nn.Module):
        def forward(self, tokens, i=None):
            return None

    obj = LanguageModelingObjective()

    def forward_step(batch, model):
        out = logits[int(batch["i"])]
        _, loss_fn = obj.forward_step(batch, lambda tokens: out)
        return out, loss_fn

    loss, _ = forward_backward_no_pipelining(forward_step, batches, Fixed(), normaliser=4)
    per_token = torch.cat([torch.nn.functional.cross_entropy(lg[0], lb[0], reduction="none")[mk[0].bool()]
                           for lg, lb, mk in zip(logits, labels, masks)])
    assert loss.item() == pytest.approx(per_token.mean().item(), rel=1e-12)
    assert logits[1].grad[0, 1:].abs().sum() == 0  # masked positions get no gradient


def test_vocab_parallel_cross_entropy_at_tp1_matches_torch():
    from scaletrain.nn import cross_entropy_per_token

    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    ours = cross_entropy_per_token(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 5)
    assert torch.allclose(ours, ref, rtol=1e-13, atol=0)
    w = torch.randn(2, 5, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    assert torch.allclose(g_ours, g_ref, rtol=1e-12, atol=1e-15)
    # The vocab-parallel function itself (what tp > 1 runs) at one rank gives the same numbers.
    from scaletrain.distributed.comm import Comm
    from scaletrain.nn.loss import VocabParallelCrossEntropy

    vp = VocabParallelCrossEntropy.apply(logits.flatten(0, 1), labels.flatten(), Comm.single("tp")).view(2, 5)
    (g_vp,) = torch.autograd.grad((vp * w).sum(), logits)
    assert torch.allclose(vp, ref, rtol=1e-13, atol=0) and torch.allclose(g_vp, g_ref, rtol=1e-12, atol=1e-15)


def test_cross_entropy_without_vocab_split_is_torchs():
    """At tp = 1 the loss is torch's F.cross_entropy itself (bit for bit, forward and backward, on a
    training-sized fp32 row block), not the vocab-parallel function: that one is ~2x slower there."""
    from scaletrain.nn import cross_entropy_per_token

    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 64, 512)).requires_grad_()
    labels = torch.randint(0, 512, (2, 64))
    ours = cross_entropy_per_token(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 64)
    assert torch.equal(ours, ref)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.equal(g_ours, g_ref)


def test_global_grad_norm_is_float64_accurate_in_every_dtype():
    """The norm of float32 gradients comes from their own dtype's dot product (no float64 copy of every
    gradient): still within 1e-5 of the float64 value on large, tiny-valued gradients; exact for float64."""
    from scaletrain.parallel.grads import global_grad_norm

    torch.manual_seed(0)
    grads = [1e-3 * torch.randn(2_000_000), 1e-3 * torch.randn(300, 500), torch.randn(7)]
    exact = sum(float(g.double().pow(2).sum()) for g in grads) ** 0.5
    for dtype, rel in ((torch.float64, 1e-14), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        pairs = [(torch.nn.Parameter(g.to(dtype)), g.to(dtype)) for g in grads]
        norm = global_grad_norm(pairs, ParallelDims.single())
        assert norm.dtype == torch.float64 and float(norm) == pytest.approx(exact, rel=rel), dtype
