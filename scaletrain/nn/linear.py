"""Megatron's column- and row-parallel linear layers (torch backend).

ColumnParallelLinear splits the output features over tp; RowParallelLinear splits the input
features. Shapes are set by `tp_size` at construction; the tp communicator and sequence
parallelism are bound late by `parallelize()` (DESIGN rule 1). Unbound, or at tp_size = 1, both are
plain linear layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.distributed.comm import Comm
from scaletrain.nn.init import mark
from scaletrain.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence,
    reduce_from_tp,
    reduce_scatter_to_sequence,
)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} = {n} is not divisible by tp_size = {d}")
    return n // d


class TPBound(nn.Module):
    """A layer whose collectives run over a tp communicator bound after construction."""

    tp: Comm | None = None
    sequence_parallel: bool = False
    # Set by parallelize under precision.fp8_backend = 'torchao' (nn/float8.py): the local GEMM of training
    # forwards in FP8. Parameters, names and collectives stay the same.
    fp8_matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def bind_tp(self, comm: Comm, sequence_parallel: bool) -> None:
        if comm.size != getattr(self, "tp_size", comm.size):
            raise ValueError(f"{type(self).__name__} was built for tp_size={self.tp_size}, bound to {comm.size}")
        self.tp, self.sequence_parallel = comm, sequence_parallel

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.fp8_matmul is not None and torch.is_grad_enabled():
            y = self.fp8_matmul(x, w)
            return y if b is None else y + b.to(y.dtype)
        return F.linear(x, w, b)

    def _column_input(self, x: torch.Tensor) -> torch.Tensor:
        """Input of a column-parallel matmul: replicated (grads summed over tp) or gathered from SP."""
        return gather_from_sequence(x, self.tp) if self.sequence_parallel else copy_to_tp(x, self.tp)


class ColumnParallelLinear(TPBound):
    """y = x Wᵀ (+ b) with W split along the output features.

    `fused` > 1 stores several projections that share an input as one weight of shape
    [fused, out_features/tp, in_features] (e.g. SwiGLU's gate and up): one GEMM, and every tp rank
    holds a contiguous slice of each part, so the checkpoint layout is independent of tp.

    Placement: input replicated over tp ([b, s/tp, h] sequence-sharded under SP); output sharded
    over tp along the last dim, full sequence. Weight and bias: sharded along the output dim.
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
        return self._linear(self._column_input(x), w, b)


class RowParallelLinear(TPBound):
    """y = x Wᵀ (+ b) with W split along the input features; partial outputs summed over tp.

    Placement: input sharded over tp along the last dim (full sequence); output replicated over tp,
    or sequence-sharded [b, s/tp, h] under SP (reduce-scatter instead of all-reduce). Weight:
    sharded along its input dim; the bias is replicated and added once, after the reduction.
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
        y = self._linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, self.tp) if self.sequence_parallel else reduce_from_tp(y, self.tp)
        return y if self.bias is None else y + self.bias
