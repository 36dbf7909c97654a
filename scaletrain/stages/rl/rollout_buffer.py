"""A rollout batch kept on disk while several policy updates use it (posttrain.grpo.iterations > 1), so
a run that stops between them resumes with the very batch it was training on.

Each rank writes its own microbatches (its dp share; old log-probs are exact on the last pipeline
stage) with the index of the step that generated them, as safetensors (no pickle) written to a
temporary name and renamed. A new batch never deletes one that the latest checkpoint still needs:
files older than the generation step the latest checkpoint resumes into are pruned.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from scaletrain.checkpoint import CheckpointError, latest_checkpoint, read_trainer_state

BUFFER_DIR = "rollout_buffer"


class RolloutBuffer:
    def __init__(self, run_dir: Path, rank: int, iterations: int) -> None:
        self.dir, self.rank, self.iterations = run_dir / BUFFER_DIR, rank, iterations

    def _path(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}.rank_{self.rank}.safetensors"

    def save(self, step: int, microbatches: list[dict[str, torch.Tensor]], metrics: dict[str, float]) -> None:
        """Write the batch generated at step index `step`, then prune what no checkpoint can need."""
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        flat = {f"{i}.{k}": v.contiguous() for i, mb in enumerate(microbatches) for k, v in mb.items()}
        path = self._path(step)
        tmp = path.with_name(path.name + ".tmp")
        save_file(flat, str(tmp), metadata={"step": str(step), "microbatches": str(len(microbatches)),
                                            "metrics": json.dumps(metrics)})
        os.replace(tmp, path)
        self._prune(keep_from=self._needed_by_latest_checkpoint(step))

    def _needed_by_latest_checkpoint(self, current: int) -> int:
        """The generation step a resume from the latest checkpoint continues (none yet: a restart
        samples afresh, so only the current batch matters)."""
        latest = latest_checkpoint(self.dir.parent / "checkpoints")
        if latest is None:
            return current
        done = int(read_trainer_state(latest)["step"])
        return min(current, done - done % self.iterations)

    def _prune(self, keep_from: int) -> None:
        for f in self.dir.glob(f"step_*.rank_{self.rank}.safetensors"):
            if int(f.name.split(".")[0].split("_")[1]) < keep_from:
                f.unlink(missing_ok=True)

    def load(self, step: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, float]]:
        """The batch generated at step index `step` (a resumed run between its updates)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self._path(step)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: this run resumes between the {self.iterations} updates "
                                  f"(posttrain.grpo.iterations) of the rollout batch generated at step {step + 1}, "
                                  "which is kept there; restore it, or resume from a checkpoint at a multiple of "
                                  "posttrain.grpo.iterations steps")
        self._prune(keep_from=self._needed_by_latest_checkpoint(step))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        flat = load_file(str(path))
        mbs: list[dict[str, torch.Tensor]] = [{} for _ in range(int(meta["microbatches"]))]
        for key, value in flat.items():
            i, name = key.split(".", 1)
            mbs[int(i)][name] = value
        return mbs, json.loads(meta["metrics"])
