"""Metric sinks: console (progress, ETA), metrics.jsonl, TensorBoard, wandb.

metrics.jsonl holds one JSON object per optimizer step (keys: step, loss, lr, grad_norm,
tokens_per_s, …, the objective's own metrics such as DPO's rewards_accuracy, and val_loss / val_<metric>
on validation steps). On resume, records past the checkpoint's step
(written by the interrupted run after its last save) are dropped, so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from scaletrain.config.schema import LoggingConfig


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step", 0), (int, float))
    return record if ok else None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only records with step <= last_step (atomic rewrite). A line that is not a JSON record (the
    torn last line of a run that crashed or ran out of disk mid-write) is dropped with a warning; a
    failed rewrite (a full disk) leaves the file as it was and no temporary file behind."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines()
    records = [(n, line, _record(line)) for n, line in enumerate(lines, 1) if line.strip()]
    torn = [n for n, _, r in records if r is None]
    if torn:
        print(f"scaletrain: warning: {path}: dropped line(s) {', '.join(map(str, torn))} of {len(lines)}, which are "
              "not JSON records (torn by a crash or a full disk)", file=sys.stderr, flush=True)
    kept = [line for _, line, r in records if r is not None and r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricSinks:
    """Fan-out of per-step metrics. Only the main rank constructs one with active sinks."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, *, total_steps: int, start_step: int,
                 run_config: dict[str, Any] | None = None, active: bool = True,
                 console_keys: tuple[str, ...] = ()) -> None:
        self.cfg, self.total_steps, self.active = cfg, total_steps, active
        self.console_keys = console_keys  # the objective's metrics, shown on the console line too
        self.start_step, self.t_start = start_step, time.perf_counter()
        self._tb = self._wandb = None
        self._jsonl = None
        if not active:
            return
        path = run_dir / "metrics.jsonl"
        truncate_jsonl(path, start_step)
        self._jsonl = path.open("a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.wandb:
            self._wandb = self._init_wandb(run_dir, run_config)

    def _init_wandb(self, run_dir: Path, run_config: dict[str, Any] | None):
        import wandb

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        return wandb.init(project=self.cfg.wandb_project, dir=str(run_dir), id=run_id, resume="allow",
                          mode=self.cfg.wandb_mode or None,  # type: ignore[arg-type]
                          config=run_config, name=run_dir.name)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}" if not k.startswith("val_") else f"val/{k[4:]}", v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if step % self.cfg.interval == 0 or step == self.total_steps or any(k.startswith("val_") for k in record):
            print(self._console_line(step, record), flush=True)

    def _console_line(self, step: int, r: dict[str, Any]) -> str:
        elapsed = time.perf_counter() - self.t_start
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4f}")
        if "val_loss" in r:  # absent: a validation without a loss (GRPO's held-out rewards)
            parts.append(f"val_loss {r['val_loss']:.4f}")
        for k in self.console_keys:
            for key in (k, f"val_{k}"):
                if key in r:
                    parts.append(f"{key} {r[key]:.4f}")
        if "lr" in r:
            parts.append(f"lr {r['lr']:.2e}")
        if "grad_norm" in r:
            parts.append(f"gnorm {r['grad_norm']:.3f}")
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if "tflops" in r:
            parts.append(f"{r['tflops']:.2f} TFLOP/s")
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if "mem_gb" in r:
            parts.append(f"mem {r['mem_gb']:.2f} GB")
        parts.append(f"elapsed {_fmt_duration(elapsed)}")
        parts.append(f"ETA {_fmt_duration(eta) if math.isfinite(eta) else '?'}")
        return " | ".join(parts)

    def info(self, message: str) -> None:
        if self.active:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
