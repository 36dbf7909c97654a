"""Routed experts: E SwiGLU feed-forwards stored as two stacked weights, run as one grouped GEMM.

Weights (logical, global shapes; tp shards the inner width like the dense SwiGLU, expert parallelism
shards dim 0 — `ParamSpec.expert_slice`):
    gate_up  [E, 2, f, h]   gate (row 0) and up (row 1) projections, out × in
    down     [E, h, f]
The GEMM over variable token counts per expert is `torch._grouped_mm` where it runs (CUDA, bf16, a torch
that has it), otherwise a loop of matmuls over the experts — chosen once (`select_grouped_gemm`), never
silently switched: a module set to 'grouped_mm' refuses inputs it cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.nn.init import mark

GROUPED_GEMMS = ("loop", "grouped_mm")


def select_grouped_gemm(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(impl, reason): 'grouped_mm' on CUDA with a torch that has `torch._grouped_mm`, compute in bf16 and a
    Hopper-or-newer GPU; otherwise 'loop', saying why."""
    if device.type != "cuda":
        return "loop", f"grouped GEMM: a loop over experts ({device.type}: torch._grouped_mm is CUDA-only)"
    if not hasattr(torch, "_grouped_mm"):
        return "loop", f"grouped GEMM: a loop over experts (torch {torch.__version__} has no torch._grouped_mm)"
    if torch.cuda.get_device_capability(device)[0] < 9:
        return "loop", "grouped GEMM: a loop over experts (torch._grouped_mm needs sm90+)"
    if dtype != torch.bfloat16:
        return "loop", f"grouped GEMM: a loop over experts (compute dtype {dtype}; torch._grouped_mm runs bf16)"
    return "grouped_mm", "grouped GEMM: torch._grouped_mm (CUDA, bf16)"


def bind_grouped_gemm(model: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> str | None:
    """Choose the grouped GEMM of every GroupedExperts in `model` once (select_grouped_gemm); returns the
    reason for the log, or None for a model without experts."""
    impl, reason = select_grouped_gemm(device, compute_dtype)
    found = False
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.impl, found = impl, True
    return reason if found else None


class GroupedExperts(nn.Module):
    """The routed experts of one MoE layer (`expert_weights`: parallel/expert_parallel.shard_experts slices them).

forward(x [M, h] grouped by expert, counts [E_local]) → [M, h], partial sums over tp.

    Placement: x full hidden width on every tp rank (tokens already dispatched to this ep rank, ordered
    by local expert); weights tp-sharded along f; the output is this tp rank's partial sum (the MoE
    layer reduces it over tp once, after combining)."""

    expert_weights = True

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, *, tp_size: int = 1,
                 init_std: float = 0.02, out_std: float = 0.02, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if ffn_hidden_size % tp_size:
            raise ValueError(f"expert ffn_hidden_size = {ffn_hidden_size} is not divisible by tp_size = {tp_size}")
        f = ffn_hidden_size // tp_size
        self.num_experts, self.tp_size, self.impl = num_experts, tp_size, "loop"
        # Which experts this module holds: all of them until parallelize's expert sharding keeps an ep slice.
        self.num_local_experts, self.first_expert = num_experts, 0
        self.gate_up = mark(nn.Parameter(torch.empty(num_experts, 2, f, hidden_size, dtype=dtype)),
                            "normal", init_std, 2, tp_size)
        self.down = mark(nn.Parameter(torch.empty(num_experts, hidden_size, f, dtype=dtype)),
                         "normal", out_std, 2, tp_size)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if self.impl == "grouped_mm":
            return self._grouped(x, counts)
        outs = []
        for e, part in enumerate(x.split(counts)):
            if not counts[e]:
                continue
            gate, up = F.linear(part, self.gate_up[e].flatten(0, 1)).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.down[e]))
        if outs:
            return torch.cat(outs)
        # No token reached these experts: still join the graph, so the weights get a zero gradient (not
        # None) as they do at every other layout (AdamW's decay and moments then update alike).
        return x.new_zeros(x.shape) + 0 * (self.gate_up.sum() + self.down.sum())

    def _grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if not x.is_cuda:
            raise RuntimeError("GroupedExperts.impl = 'grouped_mm' got a tensor on "
                               f"{x.device}; select_grouped_gemm chooses 'loop' off CUDA.")
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return grouped_swiglu(x, self.gate_up, self.down, offs).to(x.dtype)


def grouped_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The experts' SwiGLU as two `torch._grouped_mm` calls in bf16: x [M, h] grouped by expert, offs [E] int32
    the cumulative group ends; weights as stored (column-major views: no copy beyond the bf16 cast)."""
    w1 = gate_up.flatten(1, 2).transpose(-2, -1).to(torch.bfloat16)  # [E, h, 2f]
    h = torch._grouped_mm(x.to(torch.bfloat16), w1, offs=offs)
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1).to(torch.bfloat16), offs=offs)
