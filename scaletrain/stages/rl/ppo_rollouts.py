"""PPO's batches: GRPO's rollouts (stages/rl/rollouts.py: prompts, sampling on the training layout, rewards,
reference and sampling-time log-probs, the on-disk buffer for several updates per batch), with token-level
advantages from the critic's values instead of group-relative ones (stages/rl/ppo.py). The critic only
values the batch here (forward-only); its updates are a phase of the trainer (stages/rl/critic.py)."""

from __future__ import annotations

from typing import Any

import torch

from scaletrain.stages.rl.critic import Critic
from scaletrain.stages.rl.ppo import gae, token_rewards, whiten
from scaletrain.stages.rl.rollouts import RolloutBatches


class PPORollouts(RolloutBatches):
    needs_old_logps = True  # the per-token KL reward reads the sampling policy's log-probs

    def __init__(self, prompts: Any, *, critic: Critic, kl_beta: float, gamma: float, lam: float,
                 whiten_advantages: bool, **kwargs: Any) -> None:
        super().__init__(prompts, **kwargs)
        self.critic, self.kl_beta, self.gamma, self.lam = critic, kl_beta, gamma, lam
        self.whiten_advantages = whiten_advantages

    def _sequence_advantages(self, total: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(total)  # replaced per token in _finish

    def _finish(self, mbs: list[dict[str, torch.Tensor]], total: torch.Tensor) -> None:
        """The critic's values of the batch → per-token rewards → GAE advantages (whitened over the global
        batch) and returns; kept in the microbatches with the values (the critic's update reads them)."""
        d = self.dims
        values = self.critic.values([{k: v.to(self.device) for k, v in mb.items()} for mb in mbs])
        start = 0
        advs, rets = [], []
        for mb, v in zip(mbs, values):
            n = mb["tokens"].shape[0]
            rewards = token_rewards(total[start:start + n], mb["loss_mask"], mb.get("old_logps"),
                                    mb.get("ref_logps"), self.kl_beta)
            start += n
            a, r = gae(rewards, v.cpu(), mb["loss_mask"], self.gamma, self.lam)
            mb["old_values"] = (v.cpu() * mb["loss_mask"]).to(torch.float64)
            advs.append(a)
            rets.append(r)
        if self.whiten_advantages:
            mask = torch.cat([mb["loss_mask"] for mb in mbs]).to(self.device)
            flat = whiten(torch.cat(advs).to(self.device), mask, d.comm("dp")).cpu()
            advs = list(flat.split([mb["tokens"].shape[0] for mb in mbs]))
        for mb, a, r in zip(mbs, advs, rets):
            mb["advantages"], mb["returns"] = a, r
