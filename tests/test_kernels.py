"""Fused Triton kernels against their torch references, forward and backward, including the
vocab-parallel cross-entropy at tp=2 and a training run with every kernel selected.

On CPU they run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest) in float32 at
1e-5. Where CUDA is present the same tests run compiled on CUDA tensors in bfloat16, at bfloat16's
tolerances (torch.testing's defaults for bf16); the CPU-only refusal test is skipped there."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from scaletrain.cli import main  # noqa: E402
from scaletrain.nn.loss import cross_entropy_per_token  # noqa: E402
from scaletrain_kernels.rmsnorm import rmsnorm, rmsnorm_ref  # noqa: E402
from scaletrain_kernels.rope import rope, rope_ref  # noqa: E402
from scaletrain_kernels.swiglu import swiglu, swiglu_ref  # noqa: E402

from conftest import TINY, read_metrics, tiny_overrides  # noqa: E402
from dist_harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.parity

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = dict(rtol=1e-5, atol=1e-5)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """CPU: float32 at 1e-5. CUDA: bfloat16's relative tolerance (1.6e-2), absolute at that fraction of the
    reference's largest magnitude (a bf16 rounding step of a value near zero is relative to the tensor's scale)."""
    if not CUDA:
        torch.testing.assert_close(actual, expected, **TOL)
        return
    scale = expected.detach().abs().max().float().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1.6e-2, atol=1.6e-2 * max(scale, 1e-6))


def _randn(*shape: int) -> torch.Tensor:
    """Inputs drawn on the CPU (the same values on either device), then moved to the tests' device/dtype."""
    return torch.randn(*shape).to(DEVICE, DTYPE)


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).to(out.device, out.dtype).view_as(out))
    return out.detach(), [t.grad for t in inputs]


def test_rmsnorm_matches_reference():
    x, w = _randn(3, 7, 96), _randn(96)  # 96: not a power of two (masked block)
    (y, gk), (yr, gr) = _grads(lambda a, b: rmsnorm(a, b, 1e-5), x, w), _grads(lambda a, b: rmsnorm_ref(a, b, 1e-5), x, w)
    _close(y, yr)
    for a, b in zip(gk, gr):
        _close(a, b)


def test_swiglu_matches_reference():
    g, u = _randn(5, 1000) * 3, _randn(5, 1000)  # several blocks, a ragged tail
    (y, gk), (yr, gr) = _grads(swiglu, g, u), _grads(swiglu_ref, g, u)
    _close(y, yr)
    for a, b in zip(gk, gr):
        _close(a, b)


def test_rope_matches_reference_including_packed_positions():
    angles = torch.arange(12, dtype=torch.float64)[:, None] * torch.logspace(0, -3, 8, dtype=torch.float64)[None]
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().float().to(DEVICE), emb.sin().float().to(DEVICE)
    x = _randn(2, 6, 3, 16)
    for positions in (torch.arange(6).expand(2, 6), torch.tensor([[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10]])):
        positions = positions.to(DEVICE)
        (y, gk), (yr, gr) = (_grads(lambda a, p=positions: rope(a, cos, sin, p), x),
                             _grads(lambda a, p=positions: rope_ref(a, cos, sin, p), x))
        _close(y, yr)
        _close(gk[0], gr[0])


def test_fused_cross_entropy_matches_reference():
    logits, labels = _randn(2, 9, 3000), torch.randint(0, 3000, (2, 9)).to(DEVICE)
    (y, gk), (yr, gr) = (_grads(lambda z: cross_entropy_per_token(z, labels, fused=True), logits),
                         _grads(lambda z: cross_entropy_per_token(z, labels), logits))
    _close(y, yr)
    _close(gk[0], gr[0])


def _vocab_parallel(rank, world, logits, labels):
    from scaletrain.config.schema import ParallelConfig
    from scaletrain.distributed import ParallelDims

    dims = ParallelDims.from_config(ParallelConfig(tp=2), world, rank)
    shard = logits.chunk(2, dim=-1)[rank].clone().requires_grad_()
    loss = cross_entropy_per_token(shard, labels, dims.tp_comm, fused=True)
    loss.backward(torch.linspace(-1, 1, loss.numel()).view_as(loss))
    return loss.detach(), shard.grad


@pytest.mark.skipif(CUDA, reason="forked ranks cannot use CUDA once this process has initialised it, nor run the "
                    "kernels on CPU without the interpreter; the tp=2 split is checked on CPU")
def test_fused_cross_entropy_is_vocab_parallel():
    logits, labels = torch.randn(3, 5, 512), torch.randint(0, 512, (3, 5))
    ref = logits.clone().requires_grad_()
    loss = cross_entropy_per_token(ref, labels)
    loss.backward(torch.linspace(-1, 1, loss.numel()).view_as(loss))
    results = run_ranks(2, _vocab_parallel, logits, labels)
    for rank, (rank_loss, g) in enumerate(results):
        _close(rank_loss, loss.detach())
        _close(g, ref.grad.chunk(2, dim=-1)[rank])


def test_training_with_every_kernel_matches_the_torch_path(tmp_path, tokenizer_dir, dataset_prefix):
    runs = {}
    for name, kernels in (("torch", "[]"), ("fused", '["all"]')):
        args = ["train", "--config", TINY]
        for s in tiny_overrides(tmp_path / name, tokenizer_dir, dataset_prefix,
                                **{"train.steps": 3, "parallel.kernels": kernels, "model.hidden_size": 64,
                                   "model.num_heads": 4}):
            args += ["--set", s]
        assert main(args) == 0
        runs[name] = [m["loss"] for m in read_metrics(tmp_path / name)]
    # On CUDA the run computes in bf16 autocast (precision auto), where the fused and torch paths round differently.
    assert runs["fused"] == pytest.approx(runs["torch"], rel=2e-2 if CUDA else 1e-4)


@pytest.mark.skipif(CUDA, reason="checks the CPU-only refusal")
def test_kernels_on_cpu_without_the_interpreter_are_a_clear_error(tmp_path, tokenizer_dir, dataset_prefix,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = ["train", "--config", TINY]
    for s in tiny_overrides(tmp_path / "r", tokenizer_dir, dataset_prefix, **{"parallel.kernels": '["rmsnorm"]'}):
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Triton kernels need a CUDA device" in err and "TRITON_INTERPRET=1" in err
    assert main(args[:-2] + ["--set", 'parallel.kernels=["fastnorm"]']) == 2
    assert "parallel.kernels: 'fastnorm' is not one of" in capsys.readouterr().err
