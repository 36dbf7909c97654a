"""The MoE combine's weighted scatter-add (nn/moe/scatter.py): gradients by torch.autograd.gradcheck, equality
with the plain `index_add` it replaces (duplicate tokens, as top-k > 1 makes; dropped tokens; mixed dtypes), and
what it keeps for backward (saved-tensor hooks): ys, the weight and the token index, not the weighted copy."""

from __future__ import annotations

import pytest
import torch

from scaletrain.nn.moe.scatter import weighted_scatter_add
from scaletrain.profile.activations import saved_activation_bytes

pytestmark = pytest.mark.unit


def _assignments(n: int, k: int, h: int, dtype: torch.dtype, seed: int = 0, drop: int = 0):
    """Top-k style assignments of n tokens, sorted by a random expert id like MoE.combine: every token appears
    k times (minus `drop` dropped assignments), in an order that is not the tokens'."""
    g = torch.Generator().manual_seed(seed)
    token = torch.arange(n).repeat_interleave(k)
    perm = torch.randperm(n * k, generator=g)[: n * k - drop]
    token = token[perm]
    ys = torch.randn(token.numel(), h, dtype=dtype, generator=g, requires_grad=True)
    weight = torch.rand(token.numel(), dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        generator=g).requires_grad_()
    return ys, weight, token


def _plain(ys, weight, token, n, out_dtype):
    """What MoE.combine computed before: the weighted product in ys's dtype, index_add in out_dtype."""
    src = (ys * weight.unsqueeze(1).to(ys.dtype)).to(out_dtype)
    return torch.zeros(n, ys.shape[1], dtype=out_dtype).index_add(0, token, src)


@pytest.mark.parametrize("drop", [0, 3])
def test_gradcheck_float64(drop):
    """Analytic gradients of ys and weight against finite differences, with duplicate tokens (top-3) and
    with dropped assignments (tokens named fewer times or not at all)."""
    ys, weight, token = _assignments(5, 3, 4, torch.float64, drop=drop)
    assert torch.autograd.gradcheck(lambda y, w: weighted_scatter_add(y, w, token, 5), (ys, weight))
    assert torch.autograd.gradgradcheck(lambda y, w: weighted_scatter_add(y, w, token, 5), (ys, weight))


@pytest.mark.parametrize("ys_dtype,out_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                                (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_duplicate_tokens_match_index_add(ys_dtype, out_dtype):
    """Top-4 of 7 tokens (each token four times, some assignments dropped): output and gradients equal the plain
    index_add's bit for bit (the same operations in the same dtypes and order)."""
    n, k, h = 7, 4, 10
    ys, weight, token = _assignments(n, k, h, ys_dtype, seed=1, drop=2)
    assert token.bincount(minlength=n).max() == k  # duplicates present
    g = torch.randn(n, h, dtype=out_dtype, generator=torch.Generator().manual_seed(2))
    out = weighted_scatter_add(ys, weight, token, n, out_dtype)
    grads = torch.autograd.grad(out, (ys, weight), g)
    ref = _plain(ys, weight, token, n, out_dtype)
    ref_grads = torch.autograd.grad(ref, (ys, weight), g)
    assert out.dtype == out_dtype and torch.equal(out, ref)
    for mine, theirs in zip(grads, ref_grads):
        assert mine.dtype == theirs.dtype
        assert torch.equal(mine, theirs)


def test_keeps_one_copy_of_the_expert_outputs():
    """Saved for backward: ys, the weight (in ys's dtype) and the token index — the plain ops keep the weighted
    product too (index_add's backward formula saves its source): one k·h copy per token more."""
    m, h = 64, 32
    ys, weight, token = _assignments(16, 4, h, torch.float32, seed=3)
    _, saved = saved_activation_bytes(lambda: weighted_scatter_add(ys, weight, token, 16), [ys, weight])
    assert saved == m * 8  # token (int64); ys and weight are the caller's own tensors (excluded like leaves)
    y2 = ys * 1.0  # a non-leaf ys, as the experts' output is
    _, mine = saved_activation_bytes(lambda: weighted_scatter_add(y2, weight, token, 16), [ys, weight])
    _, plain = saved_activation_bytes(lambda: _plain(y2, weight, token, 16, torch.float32), [ys, weight])
    assert mine == m * h * 4 + m * 8
    assert plain - mine == m * h * 4


def test_bad_shapes_are_refused():
    ys, weight, token = _assignments(4, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="weight \\[M\\]"):
        weighted_scatter_add(ys, weight[:-1], token, 4)
