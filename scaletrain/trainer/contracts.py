"""The typed contracts between the trainer and a training stage.

The trainer (trainer/loop.py, trainer/step.py) runs the same step for every stage (DESIGN rule 5). What
differs between pretraining, SFT, DPO, GRPO, PPO and distillation comes in through four contracts:

- `Objective`: the loss. `forward_step(batch, model) -> (output, loss_fn)` for the schedule, `count(batch)`
  for the one global normaliser, optional `prepare` (host-side model input of a microbatch) and `annotate`
  (a collective pass over the step's microbatches once they are on the device: a teacher's outputs).
- `BatchSource`: per step, this dp rank's microbatches; its own metrics for the step's record.
- `Phase`: extra work of a stage at a named point of the loop — once before the first step (DPO's
  reference log-probs), before each policy update (PPO's critic update), at each checkpoint (the critic's
  state beside the policy's) — never a side effect of a data iterator or a mutable flag.
- `Validator`: what a validation computes (the loss over held-out batches, or GRPO's held-out rewards).

A stage (scaletrain/stages/stage.py) builds one of each; the trainer calls only the methods named here.

Placement: microbatches are host tensors when a BatchSource yields them; `prepare_batches` moves them to
the device, applies `prepare`, splits them over cp, then calls `annotate` (trainer/step.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

Batch = dict[str, torch.Tensor]
# loss_fn(output) -> (summed loss of the microbatch's items, {metric name: sum over its items})
LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Objective(ABC):
    """A training loss in the schedule's forward_step/loss_fn form, normalised by a global item count."""

    name: str = ""
    metrics: tuple[str, ...] = ()  # sums loss_fn returns besides the loss, logged as means per loss item

    def prepare(self, batch: Batch) -> Batch:
        """The model input of one microbatch (on the device, before any cp split); default: unchanged."""
        return batch

    def annotate(self, microbatches: list[Batch]) -> None:
        """Add to the step's prepared microbatches in a collective pass (a pipelined teacher's outputs);
        default: nothing. Every rank of the model's tp/pp groups calls it with its own microbatches."""
        return None

    @abstractmethod
    def count(self, batch: Batch) -> torch.Tensor:
        """Loss items of this microbatch (tokens, pairs, completions): its share of the normaliser."""

    @abstractmethod
    def forward_step(self, batch: Batch, model: torch.nn.Module) -> tuple[torch.Tensor, LossFn]:
        """Run `model` on the microbatch; return its output and the loss function the last stage applies."""


class BatchSource(Protocol):
    """Per optimizer step, this dp rank's list of microbatches (host tensors), and the step's own metrics.

    A Protocol so that the data layer's plain `StepBatches` conforms without importing the trainer; stage
    sources subclass it for the defaults."""

    console_keys: tuple[str, ...]

    def __iter__(self) -> BatchSource:
        return self

    def __next__(self) -> list[Batch]: ...

    def metrics(self) -> dict[str, float]:
        """Metrics of the batch `__next__` returned last (rollout rewards, sampling time), already global."""
        return {}


class Phase(ABC):  # noqa: B024 (every hook has a default: a phase overrides the ones it needs)
    """Extra work of a stage at named points of the loop, beside the policy's update.

    The trainer calls, in this order: `before_training` once before the first step of this process (after
    resumption); per step `before_step` after the batch is drawn and before the policy's update (its
    metrics join the step's record); `on_checkpoint` right after each policy checkpoint is written."""

    name: str = ""
    console_keys: tuple[str, ...] = ()

    def before_training(self) -> None:
        return None

    def before_step(self, step: int, microbatches: list[Batch]) -> dict[str, float]:
        """`step`: the index of the step about to run (0-based, = steps done so far)."""
        return {}

    def on_checkpoint(self, run_dir: Path, step: int, health: dict[str, Any]) -> None:
        return None


class Validator(ABC):
    """One validation: (validation loss or None, {metric: value}); logged as val_loss and val_<metric>."""

    @abstractmethod
    def __call__(self) -> tuple[float | None, dict[str, float]]: ...
