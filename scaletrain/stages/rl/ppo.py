"""PPO's pieces beside the policy loss: per-token rewards, GAE, whitening and the critic's value loss.

RLHF as InstructGPT runs it: the policy samples a completion per prompt; its reward is the sequence
score (a reward model and/or verifiable rewards) on the completion's last token, minus β times the
per-token KL estimate log π_old − log π_ref on every token (the penalty lives in the reward, so the
policy loss has none). A critic V (a score-head model, one value per position, trained beside the
policy) gives the baseline: generalised advantage estimation over each completion,

    δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   R_t = A_t + V_t   (V after the last token = 0),

advantages whitened over the global batch's completion tokens, then PPO's clipped surrogate on A_t
(stages/rl/grpo.py's loss with per-token advantages) and the critic's clipped value loss on R_t.

Placement: values, log-probs and so advantages are exact on the last pipeline stage (where the losses
run); every rank computes the same arithmetic on what it holds.
"""

from __future__ import annotations

import torch

from scaletrain.data.packing import model_inputs
from scaletrain.distributed.dims import ParallelDims
from scaletrain.generation.scoring import per_token_pass
from scaletrain.trainer.contracts import Objective

METRICS = ("value_loss", "value_clip_fraction")


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, old_logps: torch.Tensor | None,
                  ref_logps: torch.Tensor | None, kl_beta: float) -> torch.Tensor:
    """[b, s] per-token rewards: −β·(log π_old − log π_ref) on completion tokens, plus each row's
    sequence score [b] on its last completion token."""
    m = mask.to(torch.float64)
    r = torch.zeros_like(m)
    if kl_beta and ref_logps is not None and old_logps is not None:
        r = -kl_beta * (old_logps.double() - ref_logps.double()) * m
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m.bool(), positions, -1).amax(-1)
    rows = torch.arange(m.shape[0], device=m.device)
    has = last >= 0
    r[rows[has], last[has]] += scores.to(r.device, torch.float64)[has]
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [b, s] over each row's masked (completion) positions, which are contiguous;
    zero elsewhere. The value after a row's last completion token is 0 (the episode ends)."""
    m = mask.to(torch.float64)
    v = values.double() * m
    r = rewards.double() * m
    adv = torch.zeros_like(m)
    running = torch.zeros(m.shape[0], dtype=torch.float64, device=m.device)
    next_value = torch.zeros_like(running)
    for t in range(m.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
        next_value = v[:, t] * m[:, t]  # outside the completion the chain restarts at 0
    return adv, (adv + v) * m


def whiten(adv: torch.Tensor, mask: torch.Tensor, dp_comm=None, eps: float = 1e-8) -> torch.Tensor:
    """Advantages shifted and scaled to mean 0, std 1 over the masked tokens of the whole global batch
    (statistics summed over dp; each replica holds its share of the rows)."""
    m = mask.to(torch.float64)
    stats = torch.stack([(adv * m).sum(), (adv * adv * m).sum(), m.sum()])
    if dp_comm is not None and dp_comm.size > 1:
        stats = dp_comm.all_reduce(stats)
    mean = stats[0] / stats[2].clamp(min=1)
    var = (stats[1] / stats[2].clamp(min=1) - mean * mean).clamp(min=0)
    return (adv - mean) * torch.rsqrt(var + eps) * m


@torch.no_grad()
def token_values(critic: torch.nn.Module, dims: ParallelDims, microbatches: list[dict], *, precision) -> list[torch.Tensor]:
    """The critic's value [b, s] at every position of each microbatch (on the device), exact on the last
    pipeline stage (whole rows on every cp rank), zeros elsewhere. Collective over tp, cp and pp."""
    out: dict[int, torch.Tensor] = {}

    def forward_step(batch: dict[str, torch.Tensor], module: torch.nn.Module):
        scores = module(batch["tokens"], **model_inputs(batch))

        def record(output: torch.Tensor):
            out[int(batch["mb"])] = output[..., 0].double()
            return output.new_zeros(()), {}

        return scores, record

    return per_token_pass(critic, dims, microbatches, forward_step, out, precision=precision)


class ValueObjective(Objective):
    """The critic's loss per completion token: ½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²), summed and
    normalised by the global number of completion tokens (the shared normaliser)."""

    name = "value"
    metrics = METRICS

    def __init__(self, clip: float = 0.2) -> None:
        self.clip = clip

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["loss_mask"].sum()

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        scores = model(batch["tokens"], **model_inputs(batch))

        def loss_fn(output: torch.Tensor):
            v = output[..., 0]
            returns, old = batch["returns"].to(v.dtype), batch["old_values"].to(v.dtype)
            m = batch["loss_mask"].to(v.dtype)
            plain = (v - returns) ** 2
            if self.clip > 0:
                clipped = (old + torch.clamp(v - old, -self.clip, self.clip) - returns) ** 2
                per_token = 0.5 * torch.maximum(plain, clipped)
                frac = ((clipped > plain).to(v.dtype) * m).sum()
            else:
                per_token, frac = 0.5 * plain, torch.zeros((), dtype=v.dtype, device=v.device)
            return (per_token * m).sum(), {"value_loss": (per_token.detach() * m).sum(), "value_clip_fraction": frac}

        return scores, loss_fn
