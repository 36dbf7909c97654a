"""The mixture-of-experts feed-forward block (`MoE`), a drop-in for the dense SwiGLU of a decoder block.

    y = Σ_k w_k(x) · expert_{e_k(x)}(x)  [+ shared(x)]

Placement: input [b, s, h] replicated over tp, or [b, s/tp, h] sequence-sharded under SP — gathered
first, so every tp rank routes the same full microbatch; output like the input (reduce-scatter under
SP, all-reduce otherwise, once, after the combine). Routed experts are tp-sharded along their inner
width (expert-tp = tp) and, under expert parallelism (`bind_ep`), split over the ep ranks, tokens
travelling by all-to-all (parallel/expert_parallel.py). The router weight is replicated; its gradient is
a partial sum per tp rank (the experts' outputs are), so it is tagged for the tp reduction of
`finalize_grads`, and the balancing terms, computed alike on every tp rank, are weighted by 1/tp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import ModelConfig
from scaletrain.distributed.comm import Comm
from scaletrain.nn.backend import Roles
from scaletrain.nn.linear import TPBound
from scaletrain.nn.moe.balance import MoEStats, attach_loss, in_backward
from scaletrain.nn.moe.experts import GroupedExperts
from scaletrain.nn.moe.router import Routing, TopKRouter
from scaletrain.nn.moe.scatter import weighted_scatter_add
from scaletrain.parallel.expert_parallel import run_experts_ep
from scaletrain.parallel.mappings import reduce_from_tp, reduce_scatter_to_sequence


class SharedExpert(nn.Module):
    """The always-on SwiGLU beside the routed experts: the role layers' own tp placement (gate_up
    column-parallel, fused [2, f/tp, h]; down row-parallel [h, f/tp])."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, tp_size: int, init_std: float, out_std: float,
                 dtype: torch.dtype | None, r: Roles) -> None:
        super().__init__()
        self.gate_up = r.column(hidden_size, ffn_hidden_size, tp_size=tp_size, fused=2, init_std=init_std, dtype=dtype)
        self.down = r.row(ffn_hidden_size, hidden_size, tp_size=tp_size, init_std=out_std, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoE(TPBound):
    """Router + routed experts (+ shared expert) for one decoder layer, from `cfg.moe` (see MOE docs).

    Parameters (state_dict keys under the block's `mlp.`): router.weight [E, h]; router.expert_bias [E]
    (a buffer, only with bias_update_rate > 0); experts.gate_up [E, 2, f, h]; experts.down [E, h, f];
    with a shared expert shared.gate_up.weight [2, f_s, h] and shared.down.weight [h, f_s].
    """

    binds_ep = True  # parallelize binds the ep communicator (parallel/expert_parallel.shard_experts)

    def __init__(self, cfg: ModelConfig, tp_size: int, dtype: torch.dtype | None, r: Roles) -> None:
        super().__init__()
        moe = cfg.moe
        self.tp_size, self.hidden_size = tp_size, cfg.hidden_size
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.capacity_factor, self.bias_update_rate = moe.capacity_factor, moe.bias_update_rate
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.router = TopKRouter(cfg.hidden_size, moe.num_experts, moe.top_k, score_fn=moe.score_fn,
                                 norm_topk=moe.norm_topk, with_bias=moe.bias_update_rate > 0,
                                 init_std=cfg.init_std, dtype=dtype)
        self.experts = GroupedExperts(moe.num_experts, cfg.hidden_size, moe.expert_ffn_hidden_size or cfg.ffn_hidden_size,
                                      tp_size=tp_size, init_std=cfg.init_std, out_std=out_std, dtype=dtype)
        self.shared: SharedExpert | None = None
        if moe.shared_ffn_hidden_size:
            self.shared = SharedExpert(cfg.hidden_size, moe.shared_ffn_hidden_size, tp_size, cfg.init_std, out_std,
                                       dtype, r)
        self.ep: Comm | None = None
        self.loss_scale = 0.0  # 1 / the global batch's routed tokens, set per step by the train step
        self.stats = MoEStats(moe.num_experts)

    def bind_tp(self, comm: Comm, sequence_parallel: bool) -> None:
        super().bind_tp(comm, sequence_parallel)
        if comm.size > 1:  # partial per tp rank: summed over tp by finalize_grads
            self.router.weight.sequence_parallel_grad = True  # type: ignore[attr-defined]

    def bind_ep(self, comm: Comm) -> None:
        if self.num_experts % comm.size:
            raise ValueError(f"{self.num_experts} experts do not split over ep = {comm.size}")
        self.ep = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self._column_input(x) if self.tp is not None else x
        flat = full.reshape(-1, self.hidden_size)
        training = self.training and torch.is_grad_enabled()
        routing = self.router(flat, self.capacity_factor if training else 0.0)
        y = combine(flat, routing, self.experts, self.ep)  # partial sums over tp
        if training:
            y = self._balance(y, routing, flat.shape[0])
        y = y.view(full.shape)
        if self.tp is not None:
            y = reduce_scatter_to_sequence(y, self.tp) if self.sequence_parallel else reduce_from_tp(y, self.tp)
        if self.shared is not None:
            y = y + self.shared(x)
        return y

    def _balance(self, y: torch.Tensor, routing: Routing, tokens: int) -> torch.Tensor:
        """Attach the weighted aux and z terms to the output's backward; record the routing statistics."""
        if self.loss_scale and (self.aux_loss_coef or self.z_loss_coef):
            term = self.aux_loss_coef * routing.aux + self.z_loss_coef * routing.z
            y = attach_loss(y, term * (tokens * self.loss_scale / self.tp_size))
        if not in_backward():
            dropped = torch.zeros((), device=y.device) if routing.keep is None else (~routing.keep).sum()
            self.stats.record(routing.counts, dropped, tokens, routing.aux, routing.z)
        return y


def combine(x: torch.Tensor, routing: Routing, experts: GroupedExperts, ep: Comm | None) -> torch.Tensor:
    """Σ_k w_k · expert_k(x) for x [N, h]: assignments sorted by expert (stable: the order, and with it
    every sum, is the same at every layout), run locally or through the ep all-to-all, weighted and
    summed back per token. Dropped assignments (capacity) contribute nothing."""
    n, k = routing.experts.shape
    expert = routing.experts.reshape(-1)
    token = torch.arange(n, device=x.device).repeat_interleave(k)
    weight = routing.weights.reshape(-1)
    if routing.keep is not None:
        keep = routing.keep.reshape(-1)
        expert, token, weight = expert[keep], token[keep], weight[keep]
    order = torch.argsort(expert, stable=True)
    expert, token, weight = expert[order], token[order], weight[order]
    counts = torch.bincount(expert, minlength=experts.num_experts)
    xs = x.index_select(0, token)
    if ep is None or ep.size == 1:
        ys = experts(xs, counts.tolist())  # host sync: the per-expert split sizes
    else:
        ys = run_experts_ep(xs, counts, experts, ep)
    return weighted_scatter_add(ys, weight, token, n, x.dtype)  # keeps ys, weight, token: one k·h copy
