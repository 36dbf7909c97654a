"""Megatron's column- and row-parallel linear layers (torch backend).

ColumnParallelLinear splits the output features over tp; RowParallelLinear splits the input
features. Shapes are set by `tp_size` at construction; process groups are bound late by
`parallelize()` (DESIGN rule 1). At tp_size = 1 both are plain linear layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.nn.init import mark


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} = {n} is not divisible by tp_size = {d}")
    return n // d


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ (+ b) with W split along the output features.

    `fused` > 1 stores several projections that share an input as one weight of shape
    [fused, out_features/tp, in_features] (e.g. SwiGLU's gate and up): one GEMM, and every tp rank
    holds a contiguous slice of each part, so the checkpoint layout is independent of tp.

    Placement: input replicated over tp; output sharded over tp along the last dim.
    Weight: sharded over tp along its output dim; bias likewise.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_size: int = 1, bias: bool = False,
                 fused: int = 1, init_std: float = 0.02, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.tp_size, self.fused = in_features, out_features, tp_size, fused
        self.out_per_partition = _divide(out_features, tp_size, "out_features")
        shape = (fused, self.out_per_partition, in_features) if fused > 1 else (self.out_per_partition, in_features)
        shard_dim = 1 if fused > 1 else 0
        self.weight = mark(nn.Parameter(torch.empty(shape, dtype=dtype)), "normal", init_std, shard_dim, tp_size)
        self.bias: nn.Parameter | None = None
        if bias:
            bshape = (fused, self.out_per_partition) if fused > 1 else (self.out_per_partition,)
            self.bias = mark(nn.Parameter(torch.empty(bshape, dtype=dtype)), "zeros", 0.0, shard_dim, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.flatten(0, 1) if self.fused > 1 else self.weight
        b = None if self.bias is None else self.bias.flatten()
        return F.linear(x, w, b)


class RowParallelLinear(nn.Module):
    """y = x Wᵀ (+ b) with W split along the input features; partial outputs summed over tp.

    Placement: input sharded over tp along the last dim; output replicated over tp (or
    sequence-sharded under sequence parallelism). Weight: sharded along its input dim; the bias is
    replicated and added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_size: int = 1, bias: bool = False,
                 init_std: float = 0.02, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.tp_size = in_features, out_features, tp_size
        self.in_per_partition = _divide(in_features, tp_size, "in_features")
        self.weight = mark(nn.Parameter(torch.empty(out_features, self.in_per_partition, dtype=dtype)),
                           "normal", init_std, 1, tp_size)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = mark(nn.Parameter(torch.empty(out_features, dtype=dtype)), "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
