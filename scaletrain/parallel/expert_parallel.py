"""Expert parallelism: token dispatch/combine by all-to-all over the ep group, and the expert sharding.

Routed experts are split over the ep ranks (ep rank r holds experts [r·E/ep, (r+1)·E/ep)); the ep group
is carved from dp × cp (`ParallelDims`: consecutive dp·cp ranks of one tp rank and pp stage), so each ep
rank routes its own tokens and sends every token to the rank that holds its expert. The counts travel
first (one small all-to-all, a host sync: the token all-to-all needs its split sizes as numbers), then
the tokens, variable-size (no padding); the combine is the same exchange backwards. Both are autograd
functions whose backward is the reverse exchange.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from scaletrain.distributed.comm import Comm
from scaletrain.nn.init import spec_of


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        ctx.comm, ctx.out_splits, ctx.in_splits = comm, out_splits, in_splits
        return comm.all_to_all(x, out_splits, in_splits)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.comm.all_to_all(g.contiguous(), ctx.in_splits, ctx.out_splits), None, None, None


def all_to_all(x: torch.Tensor, comm: Comm, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    """Differentiable variable-size all-to-all along dim 0 (see Comm.all_to_all)."""
    if comm.size == 1:
        return x
    return _AllToAll.apply(x, comm, out_splits, in_splits)


def exchange_counts(send: torch.Tensor, comm: Comm) -> torch.Tensor:
    """send: [ep, E_local] tokens this rank sends to each ep rank's local experts. Returns [ep, E_local]:
    row s = what ep rank s sends to this rank's experts."""
    return comm.all_to_all(send.contiguous(), [1] * comm.size, [1] * comm.size, op="all_to_all_counts")


def expert_major(recv: list[list[int]], device: torch.device) -> torch.Tensor:
    """Indices that reorder received rows from (source rank, local expert) order to (local expert, source)."""
    starts: list[list[int]] = []
    offset = 0
    for row in recv:
        starts.append([])
        for n in row:
            starts[-1].append(offset)
            offset += n
    parts = [torch.arange(starts[s][e], starts[s][e] + recv[s][e], device=device)
             for e in range(len(recv[0]) if recv else 0) for s in range(len(recv))]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def run_experts_ep(xs: torch.Tensor, counts: torch.Tensor, experts, ep: Comm) -> torch.Tensor:
    """xs: [M, h] this rank's routed tokens sorted by global expert id, counts [E] per expert. Sends them to
    their experts' ep ranks, runs the local experts (`experts(x, counts_per_local_expert)`), sends the
    outputs back. Returns [M, h] in xs's order (partial sums over tp, like the experts' output)."""
    send = counts.view(ep.size, -1)
    recv = exchange_counts(send, ep).tolist()  # host sync: split sizes must be numbers
    in_splits = send.sum(1).tolist()
    out_splits = [sum(row) for row in recv]
    xr = all_to_all(xs, ep, out_splits, in_splits)
    order = expert_major(recv, xs.device)
    per_expert = [sum(recv[s][e] for s in range(len(recv))) for e in range(send.shape[1])]
    ye = experts(xr.index_select(0, order), per_expert)
    yr = ye.index_select(0, torch.argsort(order))
    return all_to_all(yr, ep, in_splits, out_splits)


@torch.no_grad()
def shard_experts(model: torch.nn.Module, ep: Comm) -> None:
    """Keep only this ep rank's experts in every `GroupedExperts`-like module (one with `num_experts` and
    stacked `gate_up` / `down` weights) of a meta-device model, recording the slice in each ParamSpec
    (global shapes stay those of all experts: checkpoints reshard across ep sizes) and binding the ep
    communicator to the MoE layers (`bind_ep`). Runs before materialisation (parallelize)."""
    for module in model.modules():
        if getattr(module, "binds_ep", False):
            module.bind_ep(ep)  # type: ignore[operator]
        if not getattr(module, "expert_weights", False) or ep.size == 1:
            continue
        per_rank = int(module.num_experts) // ep.size  # type: ignore[arg-type]
        first = ep.rank * per_rank
        for name in ("gate_up", "down"):
            p: nn.Parameter = getattr(module, name)
            spec = spec_of(p)
            local = nn.Parameter(torch.empty((per_rank, *p.shape[1:]), dtype=p.dtype, device=p.device),
                                 requires_grad=p.requires_grad)
            local.scaletrain_spec = dataclasses.replace(spec, expert_slice=(first, per_rank))  # type: ignore[attr-defined]
            setattr(module, name, local)
        module.num_local_experts, module.first_expert = per_rank, first  # type: ignore[assignment]
