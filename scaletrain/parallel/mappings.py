"""Autograd-aware tensor-parallel mappings (Megatron's f/g operators and their sequence-parallel forms).

Each pairs a forward collective with its adjoint in backward:

    copy_to_tp            fwd identity          bwd all-reduce     (input of a column-parallel layer)
    reduce_from_tp        fwd all-reduce        bwd identity       (output of a row-parallel layer)
    gather_from_sequence  fwd all-gather (seq)  bwd reduce-scatter (SP: into a column-parallel layer)
    reduce_scatter_to_sequence  fwd reduce-scatter (seq)  bwd all-gather  (SP: out of a row-parallel layer)
    scatter_to_sequence   fwd split (seq)       bwd all-gather     (SP: entering the first norm region)
    gather_from_sequence_replicated  fwd all-gather (seq)  bwd split  (SP: leaving it, replicated grads)

Tensors are [batch, seq, hidden]; the sequence dim is 1.
"""

from __future__ import annotations

import torch

from scaletrain.distributed.comm import Comm

SEQ_DIM = 1


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm: Comm):
        ctx.comm = comm
        return x

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.all_reduce(g.contiguous()), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm: Comm):
        return comm.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm: Comm, backward_reduce: bool):
        ctx.comm, ctx.backward_reduce = comm, backward_reduce
        return comm.all_gather(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        if ctx.backward_reduce:
            return ctx.comm.reduce_scatter(g, SEQ_DIM), None, None
        return ctx.comm.split(g, SEQ_DIM), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm: Comm):
        ctx.comm = comm
        return comm.reduce_scatter(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.all_gather(g, SEQ_DIM), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm: Comm):
        ctx.comm = comm
        return comm.split(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return ctx.comm.all_gather(g, SEQ_DIM), None


def copy_to_tp(x: torch.Tensor, comm: Comm | None) -> torch.Tensor:
    """Replicated input → replicated input whose gradient is summed over tp."""
    return x if comm is None or comm.size == 1 else _CopyToTP.apply(x, comm)


def reduce_from_tp(x: torch.Tensor, comm: Comm | None) -> torch.Tensor:
    """Partial sums on each tp rank → their sum, replicated."""
    return x if comm is None or comm.size == 1 else _ReduceFromTP.apply(x, comm)


def gather_from_sequence(x: torch.Tensor, comm: Comm | None) -> torch.Tensor:
    """Sequence-sharded [b, s/tp, h] → full [b, s, h]; backward reduce-scatters partial grads."""
    return x if comm is None or comm.size == 1 else _GatherFromSequence.apply(x, comm, True)


def gather_from_sequence_replicated(x: torch.Tensor, comm: Comm | None) -> torch.Tensor:
    """Sequence-sharded → full, where downstream grads are already replicated (backward: take own slice)."""
    return x if comm is None or comm.size == 1 else _GatherFromSequence.apply(x, comm, False)


def reduce_scatter_to_sequence(x: torch.Tensor, comm: Comm | None) -> torch.Tensor:
    """Partial sums [b, s, h] → summed and sequence-sharded [b, s/tp, h]."""
    return x if comm is None or comm.size == 1 else _ReduceScatterToSequence.apply(x, comm)


def scatter_to_sequence(x: torch.Tensor, comm: Comm | None) -> torch.Tensor:
    """Replicated [b, s, h] → this rank's sequence slice; backward all-gathers."""
    return x if comm is None or comm.size == 1 else _ScatterToSequence.apply(x, comm)
