"""The GRPO objective: group-relative policy gradient on verifiable rewards (DeepSeekMath's GRPO,
with DAPO's token-level normalisation by default).

For each prompt a group of G completions is sampled (stages/rl/rollouts.py); each completion's
advantage is its reward minus the group mean, divided by the group's standard deviation (sample
std, + 1e-4; `scale_rewards = false` leaves it centred only, as Dr. GRPO argues). Every completion
token gets its completion's advantage A. With one policy update per rollout batch (on-policy, TRL's
default) the importance ratio π/π_old is 1 in value and the per-token loss is

    −A · exp(log π − sg(log π))  [+ β · (exp(r − log π) − (r − log π) − 1),  r = log π_ref]

whose gradient is −A ∇log π plus β times the gradient of the k3 estimate of KL(π ‖ π_ref). With
posttrain.grpo.iterations = μ > 1 each batch serves μ updates, and the surrogate is PPO's clipped one
against the log-probs at sampling time: −min(ρA, clip(ρ, 1 − ε, 1 + ε_high)·A), ρ = exp(log π − log π_old)
(ε_high > ε is DAPO's clip-higher); `clip_fraction` counts the tokens whose clipped branch is active.
Log-probs are taken at the sampling temperature and through the vocab-parallel cross-entropy (the
vocabulary is never gathered). Normalisation ('token': all completion tokens of the global batch;
'sequence': per-completion means over the global number of completions) goes through the shared
normaliser (`count`) like every objective. Under context parallelism each rank holds part of every
row: 'token' sums need nothing more; 'sequence' means sum each row's parts over cp first
(`sum_over_cp`) and every cp rank evaluates the whole rows' loss, counted cp times (as DPO does).
"""

from __future__ import annotations

import torch

from scaletrain.data.packing import model_inputs
from scaletrain.distributed.comm import Comm
from scaletrain.nn import cross_entropy_per_token
from scaletrain.parallel.context_parallel import sum_over_cp
from scaletrain.trainer.contracts import Objective

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """[n] rewards of consecutive groups → [n] advantages: centred per group, divided by its std
    (unbiased) + 1e-4 when `scale`. A group whose rewards are all equal gets zeros (no signal)."""
    r = rewards.double().reshape(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    return centred.reshape(-1)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """[n] completion lengths → [n] rewards ≤ 0: DAPO's soft overlong punishment. 0 up to
    max_new_tokens − buffer tokens, then falling linearly to −factor at max_new_tokens (where sampling
    cuts a completion off), so that running long costs before it is truncated."""
    if buffer <= 0 or factor == 0:
        return torch.zeros(lengths.shape, dtype=torch.float64)
    over = (lengths.double() - (max_new_tokens - buffer)).clamp(0, buffer)
    return -factor * over / buffer


class GRPOObjective(Objective):
    name = "grpo"

    def __init__(self, tp: Comm | None, *, kl_beta: float = 0.0, temperature: float = 1.0,
                 loss_norm: str = "token", fused_cross_entropy: bool = False, clipped: bool = False,
                 clip_eps: float = 0.2, clip_eps_high: float = 0.0, cp: Comm | None = None) -> None:
        if loss_norm not in ("token", "sequence"):
            raise ValueError(f"loss_norm must be 'token' or 'sequence', got {loss_norm!r}")
        self.tp, self.kl_beta, self.temperature = tp, kl_beta, temperature
        self.loss_norm, self.fused = loss_norm, fused_cross_entropy
        self.cp = cp if cp is not None and cp.size > 1 else None  # each rank holds part of every row
        self.clip_low, self.clip_high = clip_eps, clip_eps_high or clip_eps
        # means per loss item, like the loss; clipping needs the batch's old log-probs (grpo_iterations > 1)
        self.metrics: tuple[str, ...] = ("kl",) * bool(kl_beta) + ("clip_fraction",) * clipped

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss_norm == "token":
            return batch["loss_mask"].sum()
        return torch.tensor(batch["loss_mask"].shape[0], device=batch["loss_mask"].device)

    def _reduce(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.loss_norm == "token":
            return (per_token * mask).sum()
        sums, lengths = (per_token * mask).sum(-1), mask.sum(-1)
        if self.cp is not None:  # whole rows' sums and lengths on every cp rank
            sums, lengths = sum_over_cp(sums, self.cp), self.cp.all_reduce(lengths.detach().clone())
        return (sums / lengths.clamp_min(1)).sum()

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        logits = model(batch["tokens"], **model_inputs(batch))
        labels = batch["labels"]

        def loss_fn(output: torch.Tensor):
            scaled = output if self.temperature == 1.0 else output / self.temperature
            logp = -cross_entropy_per_token(scaled, labels, self.tp, fused=self.fused)
            mask = batch["loss_mask"].to(logp.dtype)
            advantages = batch["advantages"].to(logp.dtype)
            if advantages.dim() == 1:  # GRPO: one per completion; PPO brings one per token [b, s]
                advantages = advantages[:, None]
            metrics: dict[str, torch.Tensor] = {}
            if "old_logps" in batch:  # the batch serves several updates: PPO's clipped surrogate
                ratio = torch.exp(logp - batch["old_logps"].to(logp.dtype))
                plain = ratio * advantages
                clipped = torch.clamp(ratio, 1 - self.clip_low, 1 + self.clip_high) * advantages
                per_token = -torch.minimum(plain, clipped)
                metrics["clip_fraction"] = self._reduce((clipped < plain).to(logp.dtype), mask)
            else:
                per_token = -torch.exp(logp - logp.detach()) * advantages  # on-policy ratio: 1, gradient ∇log π
            if self.kl_beta:
                d = batch["ref_logps"].to(logp.dtype) - logp
                kl = torch.exp(d) - d - 1  # k3: unbiased, always ≥ 0
                per_token = per_token + self.kl_beta * kl
                metrics["kl"] = self._reduce(kl.detach(), mask)
            return self._reduce(per_token, mask), metrics

        return logits, loss_fn
