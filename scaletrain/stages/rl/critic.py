"""PPO's batches: GRPO's rollouts (stages/rl/rollouts.py: prompts, sampling on the training layout,
rewards, reference and sampling-time log-probs, the on-disk buffer for several updates per batch),
with token-level advantages from a learned critic instead of group-relative ones (stages/rl/ppo.py).

The critic — a score-head model in the policy's layout, with its own AdamW — is owned here: each new
rollout batch is valued, advantages and returns are computed, and the critic takes its
posttrain.grpo_iterations updates on the batch right away (the policy's advantages are fixed at
sampling time, so this order changes nothing the policy sees). It is saved with every policy
checkpoint under run_dir/critic (the same step numbers; `save_state`) and a resumed run loads the
critic of the step it resumes from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scaletrain.stages.rl.ppo import ValueObjective, gae, token_rewards, token_values, whiten
from scaletrain.stages.rl.rollouts import RolloutBatches

CRITIC_DIR = "critic"


class PPOBatches(RolloutBatches):
    needs_old_logps = True

    def __init__(self, prompts, *, critic: torch.nn.Module, critic_optimizer, critic_lr: float, clip_grad: float,
                 kl_beta: float, gamma: float, lam: float, value_clip: float, whiten_advantages: bool,
                 keep_last: int, model_config: dict, **kwargs) -> None:
        super().__init__(prompts, **kwargs)
        self.critic, self.critic_optimizer, self.critic_lr, self.clip_grad = critic, critic_optimizer, critic_lr, clip_grad
        self.kl_beta, self.gamma, self.lam, self.whiten_advantages = kl_beta, gamma, lam, whiten_advantages
        self.value_objective = ValueObjective(value_clip)
        self.keep_last, self.model_config = keep_last, model_config
        self.console_keys = ("reward", "value_loss")
        self._critic_metrics: dict[str, float] = {}

    def _sequence_advantages(self, total: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(total)  # replaced per token in _finish

    def _finish(self, mbs: list[dict[str, torch.Tensor]], total: torch.Tensor) -> None:
        from scaletrain.trainer.step import train_step

        d = self.dims
        on_device = [{k: v.to(self.device) for k, v in mb.items()} for mb in mbs]
        values = token_values(self.critic, d, on_device, precision=self.precision)
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
            flat = whiten(torch.cat(advs).to(self.device), mask, d.comm("dp") if d is not None else None).cpu()
            advs = list(flat.split([mb["tokens"].shape[0] for mb in mbs]))
        for mb, a, r in zip(mbs, advs, rets):
            mb["advantages"], mb["returns"] = a, r
        sums: dict[str, float] = {}
        for _ in range(self.iterations):  # the critic's updates on this batch
            result = train_step(self.critic, self.critic_optimizer, self.value_objective,
                                [{k: mb[k] for k in ("tokens", "labels", "loss_mask", "position_ids", "document_ids",
                                                     "returns", "old_values")} for mb in mbs],
                                lr=self.critic_lr, clip_grad=self.clip_grad, precision=self.precision,
                                device=self.device, dims=d)
            for k, val in {**result.metrics, "value_grad_norm": result.grad_norm}.items():
                sums[k] = sums.get(k, 0.0) + val / self.iterations
        self.last_metrics.update(sums)

    def save_state(self, run_dir: Path, step: int, health: dict | None = None) -> Path:
        """The critic and its optimizer beside the policy checkpoint of `step` (the Trainer calls this), with
        the policy checkpoint's health, so that pruning keeps the critic of the newest good one too."""
        from scaletrain.checkpoint import save_checkpoint

        path = save_checkpoint(run_dir / CRITIC_DIR, step, self.critic, self.critic_optimizer,
                               {"model_config": self.model_config, **(health or {})}, keep_last=self.keep_last,
                               dims=self.dims)
        assert isinstance(path, Path)  # written synchronously (no async_save)
        return path


def load_critic_state(run_dir: Path, step: int, critic: torch.nn.Module, optimizer, dims) -> Path:
    """The critic saved with the policy checkpoint of `step` (a resumed run continues with it)."""
    from scaletrain.checkpoint import CheckpointError, load_checkpoint

    path = run_dir / CRITIC_DIR / f"step_{step:07d}"
    if not path.is_dir():
        raise CheckpointError(f"{path} is missing: a resumed PPO run needs the critic saved with its policy "
                              f"checkpoint of step {step}; restore it or start a new run directory")
    load_checkpoint(path, critic, optimizer, dims=dims)
    return path
