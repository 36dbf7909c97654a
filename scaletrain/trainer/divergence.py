"""Divergence: non-finite steps stop the run, loss spikes are flagged (and may stop it or roll it
back), and every checkpoint records whether it is good.

A step whose loss or global gradient norm is not finite has its update skipped (trainer/step.py);
`train.max_nonfinite_steps` of them in a row raise DivergenceError (exit code EXIT_DIVERGED) naming
the steps and the newest good checkpoint. With `train.loss_spike_factor` set, a finite loss above
that many times the mean of the previous `train.loss_spike_window` unflagged losses is a spike:
logged, and by `train.loss_spike_action` also a stop or a rollback to the newest good checkpoint.

The loss and gradient norm the guard sees are the globally reduced ones (the same on every rank),
and the loop still ORs its per-rank flags over the world before acting (trainer/stop.py `agree`), so
every rank takes the same decision at the same step and none stops alone while the others wait.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from scaletrain.config.schema import TrainConfig
from scaletrain.distributed.comm import Comm

# Exit code of a diverged run: distinct from 2 (bad input) and 75 (requeue), so that no launch
# script requeues a run that would only diverge again.
EXIT_DIVERGED = 3
MAX_ROLLBACKS = 3  # per launch: a spike that comes back after that many rollbacks stops the run


class DivergenceError(RuntimeError):
    """The run diverged; the message names the step, what was seen and the checkpoint to go back to."""


def weights_finite(model: torch.nn.Module, world: Comm, device: torch.device) -> bool:
    """Whether every parameter of the model, over all ranks, is finite. Collective over `world` (each
    rank checks its own shards and stages); one host sync."""
    params = [p.detach() for p in model.parameters()]
    bad = torch.zeros(1, dtype=torch.int32, device=device)
    if params:
        # A finite sum proves every element finite (NaN and inf propagate) in one cheap reduction per
        # tensor; only a non-finite sum (or an overflow of huge finite weights) needs the exact check.
        if not torch.isfinite(torch.stack([p.sum().float() for p in params]).sum()):
            bad = (~torch.stack([torch.isfinite(p).all() for p in params]).all()).to(torch.int32).reshape(1)
    world.all_reduce(bad, op="max")  # (a no-op at size 1)
    return not bool(bad.item())


class DivergenceGuard:
    """Per-step bookkeeping of finiteness and loss spikes; the same on every rank once fed agreed flags."""

    def __init__(self, t: TrainConfig) -> None:
        self.patience, self.factor, self.action = t.max_nonfinite_steps, t.loss_spike_factor, t.loss_spike_action
        self.window = t.loss_spike_window
        self.losses: deque[float] = deque(maxlen=t.loss_spike_window)
        self.streak = 0  # consecutive non-finite steps up to the current one
        self.last_finite_step: int | None = None
        self.rollbacks = 0

    def mean(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)

    def local_flags(self, loss: float, grad_norm: float) -> tuple[bool, bool]:
        """(non-finite, spike) of a step as this rank sees it; the loop agrees on them over all ranks."""
        nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        spike = (not nonfinite and self.factor > 0 and len(self.losses) == self.window and self.mean() > 0
                 and loss > self.factor * self.mean())
        return nonfinite, spike

    def update(self, step: int, loss: float, nonfinite: bool, spike: bool) -> None:
        """Advance by one step with the agreed flags. A spike stays out of the running mean."""
        if nonfinite:
            self.streak += 1
            return
        self.streak, self.last_finite_step = 0, step
        if not spike:
            self.losses.append(loss)

    @property
    def diverged(self) -> bool:
        return self.patience > 0 and self.streak >= self.patience

    def health(self, loss: float, grad_norm: float, finite_weights: bool) -> dict[str, Any]:
        """What a checkpoint written now records in its trainer_state (checkpoint/select.py reads `good`)."""
        return {"good": self.streak == 0 and finite_weights,
                "loss": loss if math.isfinite(loss) else None,
                "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                "last_finite_step": self.last_finite_step}

    def nonfinite_message(self, step: int, loss: float, grad_norm: float, good: Any) -> str:
        first = step - self.streak + 1
        last = (f"the last finite step of this launch was {self.last_finite_step}" if self.last_finite_step is not None
                else "no step of this launch was finite")
        where = (f"the newest good checkpoint is {good}. Lower optim.lr or lengthen optim.warmup_steps, then resume "
                 f"from it with --set checkpoint.load={good}" if good is not None else
                 "no good checkpoint is left. Lower optim.lr or lengthen optim.warmup_steps and start again")
        return (f"training diverged at step {step}: the loss or gradient norm was non-finite for {self.streak} "
                f"consecutive steps ({first}-{step}; at step {step} loss {loss}, grad_norm {grad_norm}), their updates "
                f"skipped; {last} and {where} (train.max_nonfinite_steps = {self.patience} sets the patience).")

    def spike_message(self, step: int, loss: float) -> str:
        return (f"step {step}: loss spike: {loss:.4f} > {self.factor:g} × {self.mean():.4f}, the mean of the previous "
                f"{len(self.losses)} steps (train.loss_spike_factor)")
