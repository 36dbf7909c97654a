"""PPO's critic: a score-head model in the policy's layout with its own AdamW, and the phase that trains it.

The critic values each new rollout batch (forward-only, while the batch is built: stages/rl/ppo_rollouts.py)
and takes posttrain.ppo.iterations updates on it in `CriticUpdate.before_step` — a named phase the trainer
calls before the policy's update of the step that sampled the batch (the policy's advantages are fixed at
sampling time, so the order changes nothing the policy sees). Later steps that reuse the batch report the
metrics of that update. It is saved with every policy checkpoint under run_dir/critic (the same step
numbers, with the policy checkpoint's health and its last update's metrics) and a resumed run loads the
critic of the step it resumes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scaletrain.checkpoint import CheckpointError, load_checkpoint, read_trainer_state, save_checkpoint
from scaletrain.checkpoint.files import step_dir_name
from scaletrain.distributed.dims import ParallelDims
from scaletrain.stages.rl.ppo import ValueObjective, token_values
from scaletrain.trainer.contracts import Batch, Phase
from scaletrain.trainer.precision import Precision
from scaletrain.trainer.step import train_step

CRITIC_DIR = "critic"
CRITIC_INPUTS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids", "returns", "old_values")


class Critic:
    """The critic model and its optimizer (constant learning rate `lr`), in the policy's layout."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, lr: float, clip_grad: float,
                 value_clip: float, dims: ParallelDims, precision: Precision, device: torch.device,
                 model_config: dict[str, Any], keep_last: int) -> None:
        self.model, self.optimizer, self.lr, self.clip_grad = model, optimizer, lr, clip_grad
        self.objective = ValueObjective(value_clip)
        self.dims, self.precision, self.device = dims, precision, device
        self.model_config, self.keep_last = model_config, keep_last

    def values(self, microbatches: list[Batch]) -> list[torch.Tensor]:
        """The critic's value [b, s] at every position of each microbatch (on the device); exact on the
        last pipeline stage. Collective over tp, cp and pp."""
        return token_values(self.model, self.dims, microbatches, precision=self.precision)

    def update(self, microbatches: list[Batch], iterations: int) -> dict[str, float]:
        """`iterations` updates on the batch's returns; means of their metrics (value loss, clipped share,
        gradient norm)."""
        sums: dict[str, float] = {}
        for _ in range(iterations):
            result = train_step(self.model, self.optimizer, self.objective,
                                [{k: mb[k] for k in CRITIC_INPUTS} for mb in microbatches], lr=self.lr,
                                clip_grad=self.clip_grad, precision=self.precision, device=self.device, dims=self.dims)
            for k, val in {**result.metrics, "value_grad_norm": result.grad_norm}.items():
                sums[k] = sums.get(k, 0.0) + val / iterations
        return sums

    def save(self, run_dir: Path, step: int, state: dict[str, Any]) -> Path:
        """The critic and its optimizer beside the policy checkpoint of `step`, with `state` (the policy
        checkpoint's health, so that pruning keeps the critic of the newest good one too)."""
        path = save_checkpoint(run_dir / CRITIC_DIR, step, self.model, self.optimizer,
                               {"model_config": self.model_config, **state}, keep_last=self.keep_last, dims=self.dims)
        assert isinstance(path, Path)  # written synchronously (no async_save)
        return path

    def load(self, run_dir: Path, step: int) -> tuple[Path, dict[str, float]]:
        """The critic saved with the policy checkpoint of `step` (a resumed run continues with it), and the
        metrics of its last update."""
        path = run_dir / CRITIC_DIR / step_dir_name(step)
        if not path.is_dir():
            raise CheckpointError(f"{path} is missing: a resumed PPO run needs the critic saved with its policy "
                                  f"checkpoint of step {step}; restore it or start a new run directory")
        load_checkpoint(path, self.model, self.optimizer, dims=self.dims)
        return path, dict(read_trainer_state(path).get("update_metrics", {}))


class CriticUpdate(Phase):
    """The critic's updates on each new rollout batch (every `iterations` steps: the steps that sample),
    before the policy's; saved beside each policy checkpoint."""

    name = "critic_update"
    console_keys = ("value_loss",)

    def __init__(self, critic: Critic, iterations: int, last: dict[str, float] | None = None) -> None:
        self.critic, self.iterations = critic, iterations
        self.last: dict[str, float] = dict(last or {})  # the latest update's metrics (a resumed run: the saved ones)

    def before_step(self, step: int, microbatches: list[Batch]) -> dict[str, float]:
        if step % self.iterations == 0:  # a fresh rollout batch (stages/rl/rollouts.py: one per `iterations` steps)
            self.last = self.critic.update(microbatches, self.iterations)
        return dict(self.last)

    def on_checkpoint(self, run_dir: Path, step: int, health: dict[str, Any]) -> None:
        self.critic.save(run_dir, step, {**health, "update_metrics": self.last})
