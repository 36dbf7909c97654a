"""Rules for the numbers that keep a run's training stable, checked up front with the other rules.

A NaN or infinite value in any float setting (`--set optim.lr=inf` parses), a learning rate that is
not positive, or a negative gradient clip would otherwise only show up as a diverged run; the
divergence guard's own settings (trainer/divergence.py) are checked here too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from scaletrain.config.schema import RunConfig

SPIKE_ACTIONS = ("warn", "stop", "rollback")


def _floats(cfg: Any, prefix: str = ""):
    """(dotted key, value) of every float setting, tuple entries and nested sections included."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{prefix}{f.name}.")
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float):
                yield f"{prefix}{f.name}", v


def stability_errors(cfg: RunConfig) -> list[str]:
    """Every broken rule, each with what to change."""
    errors = [f"{key} = {value} is not a finite number; give a real value."
              for key, value in _floats(cfg) if not math.isfinite(value)]
    o, t, pt = cfg.optim, cfg.train, cfg.posttrain
    if not o.lr > 0:  # `not >` also catches NaN
        errors.append(f"optim.lr = {o.lr} must be a positive learning rate (e.g. 3e-4).")
    if not o.min_lr >= 0:
        errors.append(f"optim.min_lr = {o.min_lr} must be 0 or positive (the learning rate the schedule decays to).")
    if not o.clip_grad >= 0:
        errors.append(f"optim.clip_grad = {o.clip_grad} must be a positive global gradient norm to clip to, or 0 "
                      "(no clipping).")
    if not pt.ppo.critic_lr >= 0:
        errors.append(f"posttrain.ppo.critic_lr = {pt.ppo.critic_lr} must be positive, or 0 (optim.lr).")
    if t.max_nonfinite_steps < 0:
        errors.append(f"train.max_nonfinite_steps = {t.max_nonfinite_steps} must be 0 (never stop) or positive "
                      "(consecutive non-finite steps that stop the run).")
    if t.loss_spike_factor and not t.loss_spike_factor > 1:
        errors.append(f"train.loss_spike_factor = {t.loss_spike_factor} must be 0 (off) or above 1 (a spike is a loss "
                      "that many times the running mean; e.g. 3.0).")
    if t.loss_spike_window < 1:
        errors.append(f"train.loss_spike_window = {t.loss_spike_window} must be at least 1 (steps in the running mean).")
    if t.loss_spike_action not in SPIKE_ACTIONS:
        errors.append(f"train.loss_spike_action = {t.loss_spike_action!r} is not one of {', '.join(SPIKE_ACTIONS)}.")
    return errors
