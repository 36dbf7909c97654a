"""The MoE combine's weighted scatter-add as one autograd function that keeps only what its backward needs.

    out[t] = Σ_{i: token_i = t} weight_i · ys_i        (ys [M, h] expert outputs, one row per assignment)

Written with plain ops (`zeros.index_add(0, token, ys * weight)`) autograd keeps ys for the multiply AND
the weighted product for `index_add` (its backward formula expands the gathered gradient to the source's
shape, so the source is saved) — two k·h copies per token. Here the backward recomputes what it needs
from the one saved copy: with g = grad_out[token], grad_ys = g · weight and grad_weight = Σ_h g · ys
(Megatron-Core's and torchtitan's unpermute keep the same three tensors). Saved: ys, the weight in ys's
dtype (the value the forward multiplied by), token.

Placement: local tensors only (the MoE layer calls it after the ep combine all-to-all, on every tp rank's
partial sums); dtypes as the plain ops had them: the product in ys's dtype, the sum in `out_dtype`.
"""

from __future__ import annotations

from typing import Any

import torch


class WeightedScatterAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ys: torch.Tensor, weight: torch.Tensor, token: torch.Tensor, num_tokens: int,
                out_dtype: torch.dtype) -> torch.Tensor:
        w = weight.to(ys.dtype)
        out = ys.new_zeros((num_tokens, ys.shape[1]), dtype=out_dtype)
        out.index_add_(0, token, (ys * w.unsqueeze(1)).to(out_dtype))
        ctx.save_for_backward(ys, w, token)
        ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ys, w, token = ctx.saved_tensors
        g = grad_out.index_select(0, token).to(ys.dtype)  # each assignment's share of its token's gradient
        grad_ys = g * w.unsqueeze(1) if ctx.needs_input_grad[0] else None
        grad_w = (g * ys).sum(-1).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_ys, grad_w, None, None, None


def weighted_scatter_add(ys: torch.Tensor, weight: torch.Tensor, token: torch.Tensor, num_tokens: int,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[num_tokens, h] = Σ over assignments i of weight_i · ys_i added into row token_i (rows no assignment
    names stay zero; a token may appear several times: top-k > 1). ys [M, h], weight [M], token [M] int64."""
    if ys.dim() != 2 or weight.shape != ys.shape[:1] or token.shape != ys.shape[:1]:
        raise ValueError(f"weighted_scatter_add: ys [M, h], weight [M], token [M] expected; got ys "
                         f"{tuple(ys.shape)}, weight {tuple(weight.shape)}, token {tuple(token.shape)}")
    return WeightedScatterAdd.apply(ys, weight, token, num_tokens, out_dtype or ys.dtype)
