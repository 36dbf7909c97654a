"""Lock-step forward-only passes under expert parallelism: the MoE layers' all-to-all (parallel/
expert_parallel.py) needs every rank of the ep group — carved from dp·cp — in every call, but each dp
replica decodes its own rows and stops when they do, and drops finished rows' microbatches from its passes.
So during decoding the ep ranks agree, per step, on whether anyone still runs and on the most microbatches
anyone feeds (one small all-reduce over the ep group); a rank with fewer feeds padding microbatches of one
padding row through the model (no KV cache) and ignores their outputs (Megatron's and torchtitan's answer
to uneven work: dummy passes so the collectives match).

Dense models and ep = 1 skip all of it (`lockstep_group` returns None): no extra collective.
"""

from __future__ import annotations

import torch

from scaletrain.distributed.comm import Comm
from scaletrain.distributed.dims import ParallelDims


def lockstep_group(model: torch.nn.Module, dims: ParallelDims) -> Comm | None:
    """The ep group whose ranks must run the same passes through `model`, or None (ep = 1, or no MoE layer
    bound to an ep group of more than one rank)."""
    if dims.ep == 1:
        return None
    for module in model.modules():
        ep = getattr(module, "ep", None) if getattr(module, "binds_ep", False) else None
        if isinstance(ep, Comm) and ep.size > 1:
            return ep
    return None


def agreed_max(group: Comm | None, value: int, device: torch.device) -> int:
    """The largest `value` over `group` (value itself where group is None). Collective over group."""
    if group is None:
        return value
    return int(group.all_reduce(torch.tensor([value], dtype=torch.long, device=device), op="max").item())


def padding_microbatch(pad_id: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One padding row of `width` tokens (a document of its own, positions from 0) with no rows to record:
    run only so this rank's MoE layers join the ep group's all-to-all; its outputs are discarded."""
    return {"tokens": torch.full((1, width), pad_id, dtype=torch.long, device=device),
            "position_ids": torch.arange(width, device=device)[None],
            "document_ids": torch.zeros((1, width), dtype=torch.long, device=device),
            "row": torch.zeros(0, dtype=torch.long, device=device)}
