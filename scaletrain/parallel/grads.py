"""Gradient finalisation and the global gradient norm under tensor and pipeline parallelism.

After backward: (a) gradients of sequence-parallel replicated parameters (norm weights) are partial
sums per tp rank and get one coalesced all-reduce over tp; (b) the two copies of a tied embedding
on the first and last pipeline rank get their gradients summed over the embedding group. The
global norm counts every parameter of the whole model once: squares of tp-sharded gradients are
summed over tp, replicated ones added once per stage, stages summed over pp, and the last rank's
tied-embedding copy left out.
"""

from __future__ import annotations

import torch

from scaletrain.distributed.comm import Comm
from scaletrain.distributed.dims import ParallelDims
from scaletrain.nn.init import spec_of


def _all_reduce_coalesced(grads: list[torch.Tensor], comm: Comm) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def finalize_grads(params: list[torch.nn.Parameter], dims: ParallelDims | None) -> None:
    """Reductions every layout needs between backward and the optimizer (one collective each)."""
    if dims is None:
        return
    if dims.tp > 1:
        _all_reduce_coalesced([p.grad for p in params if p.grad is not None
                               and getattr(p, "sequence_parallel_grad", False)], dims.tp_comm)
    embed = dims.comm("embed")
    if embed.size > 1:
        _all_reduce_coalesced([p.grad for p in params if p.grad is not None
                               and getattr(p, "pipeline_tied", False)], embed)


def global_grad_norm(params: list[torch.nn.Parameter], dims: ParallelDims | None) -> torch.Tensor:
    """L2 norm of all gradients of the whole (unsharded, unsplit) model; same value on every rank."""
    grads = [p for p in params if p.grad is not None and not getattr(p, "pipeline_tied_copy", False)]
    acc = torch.promote_types(params[0].dtype, torch.float32) if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    tp = 1 if dims is None else dims.tp

    def sq(gs: list[torch.Tensor]) -> torch.Tensor:
        if not gs:
            return torch.zeros(1, dtype=acc, device=device)
        return torch.stack([torch.linalg.vector_norm(g, dtype=acc) for g in gs]).pow(2).sum().reshape(1)

    is_sharded = [tp > 1 and spec_of(p).shard_dim is not None for p in grads]
    total = sq([p.grad for p, s in zip(grads, is_sharded) if not s])  # type: ignore[misc]
    if any(is_sharded):
        part = sq([p.grad for p, s in zip(grads, is_sharded) if s])  # type: ignore[misc]
        dims.tp_comm.all_reduce(part)  # type: ignore[union-attr]
        total = total + part
    if dims is not None and dims.pp > 1:
        dims.comm("pp").all_reduce(total)
    return total[0].sqrt()
