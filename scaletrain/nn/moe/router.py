"""Top-k router of a mixture-of-experts layer: scores, expert choice, routing weights, balancing losses.

Input: tokens [N, h], the same on every tp rank (the MoE layer gathers the sequence first). Output: the
chosen experts and their weights per token, and the layer's balancing terms (unweighted; the MoE layer
applies the coefficients and the step's normalisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.nn.init import mark


@dataclass
class Routing:
    """One routing decision over N tokens (k experts each)."""

    experts: torch.Tensor  # [N, k] global expert ids
    weights: torch.Tensor  # [N, k] routing weights (differentiable; norm_topk applied)
    keep: torch.Tensor | None  # [N, k] bool: False where capacity dropped the assignment; None: dropless
    counts: torch.Tensor  # [E] assignments per expert before dropping (float64, detached)
    aux: torch.Tensor  # E·Σ_e f_e·P_e (Switch/GShard, Megatron's normalisation), differentiable
    z: torch.Tensor  # mean_t logsumexp(logits_t)², differentiable


class TopKRouter(nn.Module):
    """logits = x Wᵀ (W: [E, h], replicated over tp and ep); softmax or sigmoid scores; top-k choice on
    the scores plus an optional selection bias (`expert_bias`, aux-loss-free balancing, a buffer moved by
    the train step, not by gradients); weights are the unbiased scores of the chosen experts."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, score_fn: str = "softmax",
                 norm_topk: bool = True, with_bias: bool = False, init_std: float = 0.02,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.score_fn, self.norm_topk = num_experts, top_k, score_fn, norm_topk
        self.weight = mark(nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype)), "normal", init_std)
        self.expert_bias: torch.Tensor | None
        if with_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=dtype))
        else:
            self.expert_bias = None

    def reset_buffers(self) -> None:
        """A meta-device model's bias starts at zero (parallelize.materialize calls this)."""
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def forward(self, x: torch.Tensor, capacity_factor: float = 0.0) -> Routing:
        """x: [N, h]. capacity_factor > 0 drops, per expert, the assignments beyond
        ceil(capacity_factor·k·N/E) with the lowest weights."""
        compute = torch.promote_types(x.dtype, torch.float32)  # router maths in fp32 at least, autocast or not
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(compute), self.weight.to(compute))
        scores = logits.softmax(-1) if self.score_fn == "softmax" else torch.sigmoid(logits)
        choose = scores.detach() if self.expert_bias is None else scores.detach() + self.expert_bias.to(compute)
        experts = choose.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if self.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if self.score_fn == "sigmoid" else 0.0))
        n = x.shape[0]
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts).to(torch.float64)
        probs = scores if self.score_fn == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        aux = self.num_experts * (probs.mean(0) * (counts.to(compute) / max(n * self.top_k, 1))).sum()
        z = torch.logsumexp(logits, -1).square().mean() if n else logits.sum()
        keep = None
        if capacity_factor > 0:
            keep = capacity_keep(experts, weights.detach(), self.num_experts,
                                 math.ceil(capacity_factor * self.top_k * n / self.num_experts))
        return Routing(experts, weights, keep, counts, aux, z)


def capacity_keep(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """[N, k] bool: an expert keeps the `capacity` assignments of highest weight (Megatron's 'probs' drop
    policy); a function of this microbatch's routing only, so every layout drops the same tokens."""
    n = experts.shape[0]
    if capacity >= n:
        return torch.ones_like(experts, dtype=torch.bool)
    dense = torch.full((n, num_experts), -math.inf, dtype=weights.dtype, device=weights.device)
    dense.scatter_(1, experts, weights)
    top = dense.topk(capacity, dim=0).indices  # [capacity, E]
    kept = torch.zeros_like(dense, dtype=torch.bool).scatter_(0, top, True) & (dense > -math.inf)
    return kept.gather(1, experts)
