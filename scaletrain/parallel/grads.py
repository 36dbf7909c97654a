"""Gradient finalisation and the global gradient norm under tensor parallelism.

After backward: gradients of sequence-parallel replicated parameters are partial sums per tp rank
and get one coalesced all-reduce over tp. The global norm counts every parameter once: squares of
tp-sharded gradients are summed over tp; replicated ones (norm weights, biases of row-parallel
layers) are identical on every tp rank and added once.
"""

from __future__ import annotations

import torch

from scaletrain.distributed.dims import ParallelDims
from scaletrain.nn.init import spec_of


def finalize_grads(params: list[torch.nn.Parameter], dims: ParallelDims | None) -> None:
    """Sum the partial gradients of sequence-parallel parameters over tp (one collective)."""
    if dims is None or dims.tp == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and getattr(p, "sequence_parallel_grad", False)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dims.tp_comm.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def global_grad_norm(params: list[torch.nn.Parameter], dims: ParallelDims | None) -> torch.Tensor:
    """L2 norm of all gradients of the whole (unsharded) model; same value on every rank."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    acc = torch.promote_types(grads[0].grad.dtype, torch.float32)  # type: ignore[union-attr]
    tp = 1 if dims is None else dims.tp
    sharded = [p.grad for p in grads if tp > 1 and spec_of(p).shard_dim is not None]
    replicated = [p.grad for p in grads if not (tp > 1 and spec_of(p).shard_dim is not None)]

    def sq(gs):
        if not gs:
            return torch.zeros((), dtype=acc, device=grads[0].device)
        return torch.stack([torch.linalg.vector_norm(g, dtype=acc) for g in gs]).pow(2).sum()

    total = sq(replicated)
    if sharded:
        s = sq(sharded).reshape(1)
        dims.tp_comm.all_reduce(s)  # type: ignore[union-attr]
        total = total + s[0]
    return total.sqrt()
