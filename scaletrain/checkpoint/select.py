"""Choosing a checkpoint by what is on disk: the newest complete one when `latest` is gone, the newest
good one for pruning and rollback.

A checkpoint is *complete* when its trainer_state.json exists: it is written last, and the directory
is renamed into place only after it (checkpoint/save.py). It is *good* unless its trainer_state says
`"good": false`: written after the last step whose loss and gradient norm were finite, or holding
non-finite weights (trainer/divergence.py). Checkpoints without the key (older ones, imports) count
as good.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scaletrain.checkpoint.files import LATEST, STATE_FILE, CheckpointError


def step_of(path: Path) -> int | None:
    """The step of a `step_NNNNNNN` directory name, None for any other name."""
    prefix, _, digits = path.name.partition("_")
    return int(digits) if prefix == "step" and digits.isdigit() else None


def step_dirs(root: Path) -> list[Path]:
    """Every step_* directory under `root` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete step_* checkpoints under `root`, oldest first."""
    return [p for p in step_dirs(root) if (p / STATE_FILE).is_file()]


def is_good(path: Path) -> bool:
    """False for a checkpoint recorded as written after the run went non-finite (or unreadable)."""
    try:
        return json.loads((path / STATE_FILE).read_text()).get("good", True) is not False
    except (OSError, ValueError, AttributeError):
        return False


def newest_good(root: Path, before: int | None = None) -> Path | None:
    """The newest complete, good checkpoint under `root` (of a step below `before`, if given)."""
    for path in reversed(complete_checkpoints(root)):
        if (before is None or (step_of(path) or 0) < before) and is_good(path):
            return path
    return None


def _warn(message: str) -> None:
    print(f"scaletrain: warning: {message}", file=sys.stderr, flush=True)


def without_pointer(root: Path, warn: bool) -> Path | None:
    """The checkpoint to resume from when `root/latest` is missing or not a file: the newest complete
    one (a crash or a user removed the pointer; starting from step 0 would overwrite and prune them),
    None where there is none. Refuses what it cannot resolve without touching a checkpoint."""
    pointer = root / LATEST
    if pointer.is_dir() and not pointer.is_symlink():
        raise CheckpointError(f"{pointer} is a directory, not the pointer file scaletrain writes (the next save "
                              "could not replace it); move it out of the way, then rerun: the run resumes from the "
                              "newest complete checkpoint.")
    complete = complete_checkpoints(root)
    if complete:
        if warn:
            what = "is not a file" if pointer.is_symlink() or pointer.exists() else "is missing"
            _warn(f"{pointer} {what}; resuming from the newest complete checkpoint, {complete[-1]}")
        return complete[-1]
    partial = step_dirs(root)
    if partial:
        raise CheckpointError(f"{root} holds {', '.join(p.name for p in partial)} but none is complete (no "
                              f"{STATE_FILE}) and {LATEST} is missing; restore them, or move them away to start the "
                              "run from step 0.")
    return None


def warn_if_not_good(path: Path) -> None:
    """Say so when the checkpoint a run resumes from was written after the run went non-finite."""
    if is_good(path):
        return
    good = newest_good(path.parent)
    _warn(f"resuming from {path}, which is not good (written after the last finite step); "
          + (f"the newest good checkpoint is {good}: resume from it with --set checkpoint.load={good}"
             if good is not None else "no good checkpoint is left"))


def latest_checkpoint(root: str | Path, *, warn: bool = False) -> Path | None:
    """The checkpoint `latest` names under `root`, or None if there is none yet. Where `latest` is missing
    or not a file, the newest complete checkpoint (checkpoint/select.py). `warn`: say so on stderr, and
    when the checkpoint is not good."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return without_pointer(Path(root), warn)
    path = Path(root) / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete; point `latest` at "
                              "a complete step_* directory or remove it to resume from the newest complete one.")
    if warn:
        warn_if_not_good(path)
    return path
