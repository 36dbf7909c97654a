"""Fused Triton kernels against their torch references, forward and backward (on CPU through
Triton's interpreter, TRITON_INTERPRET=1 set in conftest), including the vocab-parallel
cross-entropy at tp=2 and a training run with every kernel selected."""

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

TOL = dict(rtol=1e-5, atol=1e-5)


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), [t.grad for t in inputs]


def test_rmsnorm_matches_reference():
    x, w = torch.randn(3, 7, 96), torch.randn(96)  # 96: not a power of two (masked block)
    (y, gk), (yr, gr) = _grads(lambda a, b: rmsnorm(a, b, 1e-5), x, w), _grads(lambda a, b: rmsnorm_ref(a, b, 1e-5), x, w)
    torch.testing.assert_close(y, yr, **TOL)
    for a, b in zip(gk, gr):
        torch.testing.assert_close(a, b, **TOL)


def test_swiglu_matches_reference():
    g, u = torch.randn(5, 1000) * 3, torch.randn(5, 1000)  # several blocks, a ragged tail
    (y, gk), (yr, gr) = _grads(swiglu, g, u), _grads(swiglu_ref, g, u)
    torch.testing.assert_close(y, yr, **TOL)
    for a, b in zip(gk, gr):
        torch.testing.assert_close(a, b, **TOL)


def test_rope_matches_reference_including_packed_positions():
    angles = torch.arange(12, dtype=torch.float64)[:, None] * torch.logspace(0, -3, 8, dtype=torch.float64)[None]
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().float(), emb.sin().float()
    x = torch.randn(2, 6, 3, 16)
    for positions in (torch.arange(6).expand(2, 6), torch.tensor([[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10]])):
        (y, gk), (yr, gr) = (_grads(lambda a, p=positions: rope(a, cos, sin, p), x),
                             _grads(lambda a, p=positions: rope_ref(a, cos, sin, p), x))
        torch.testing.assert_close(y, yr, **TOL)
        torch.testing.assert_close(gk[0], gr[0], **TOL)


def test_fused_cross_entropy_matches_reference():
    logits, labels = torch.randn(2, 9, 3000), torch.randint(0, 3000, (2, 9))
    (y, gk), (yr, gr) = (_grads(lambda z: cross_entropy_per_token(z, labels, fused=True), logits),
                         _grads(lambda z: cross_entropy_per_token(z, labels), logits))
    torch.testing.assert_close(y, yr, **TOL)
    torch.testing.assert_close(gk[0], gr[0], **TOL)


def _vocab_parallel(rank, world, logits, labels):
    from scaletrain.config.schema import ParallelConfig
    from scaletrain.distributed import ParallelDims

    dims = ParallelDims.from_config(ParallelConfig(tp=2), world, rank)
    shard = logits.chunk(2, dim=-1)[rank].clone().requires_grad_()
    loss = cross_entropy_per_token(shard, labels, dims.tp_comm, fused=True)
    loss.backward(torch.linspace(-1, 1, loss.numel()).view_as(loss))
    return loss.detach(), shard.grad


def test_fused_cross_entropy_is_vocab_parallel():
    logits, labels = torch.randn(3, 5, 512), torch.randint(0, 512, (3, 5))
    ref = logits.clone().requires_grad_()
    loss = cross_entropy_per_token(ref, labels)
    loss.backward(torch.linspace(-1, 1, loss.numel()).view_as(loss))
    results = run_ranks(2, _vocab_parallel, logits, labels)
    for rank, (rank_loss, g) in enumerate(results):
        torch.testing.assert_close(rank_loss, loss.detach(), **TOL)
        torch.testing.assert_close(g, ref.grad.chunk(2, dim=-1)[rank], **TOL)


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
    assert runs["fused"] == pytest.approx(runs["torch"], rel=1e-4)


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
