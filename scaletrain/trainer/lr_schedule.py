"""Learning-rate schedules as pure functions of the step: nothing to save, exact on resume."""

from __future__ import annotations

import math

from scaletrain.config.schema import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps`.

    warmup: linear from lr/warmup to lr over warmup_steps. Then:
    cosine — lr → min_lr along a half cosine until the last step;
    wsd — constant lr, then the last decay_fraction·total_steps decay to min_lr (linear, cosine or 1-sqrt);
    constant — lr.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(total_steps - cfg.warmup_steps - 1, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = int(round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return cfg.lr
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        if cfg.wsd_decay_shape == "linear":
            factor = 1.0 - progress
        elif cfg.wsd_decay_shape == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # 1-sqrt (Hägele et al. 2024)
            factor = 1.0 - math.sqrt(progress)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
