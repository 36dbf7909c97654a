"""Atomic checkpoints through torch.distributed.checkpoint (DCP), stored as safetensors (checkpoint/files.py
has the directory layout).

Tensors go through DCP with its safetensors storage, which records each tensor's global offsets in
the file headers: loading executes no pickled code (DCP's default `.metadata` is a pickle) and
the same files serve a resharding load later (checkpoint/load.py). A save writes into a hidden temporary
directory, fsyncs it, renames it into place and only then rewrites `latest` (itself via rename), so a crash
at any point leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from scaletrain.checkpoint.atomic_dir import fsync_tree
from scaletrain.checkpoint.checksums import write_manifest, write_rank_part
from scaletrain.checkpoint.files import (
    LATEST,
    STATE_FILE,
    CheckpointError,
    copy_tokenizer,
    fsync_dir,
    step_dir_name,
)
from scaletrain.checkpoint.select import newest_good
from scaletrain.checkpoint.state import snapshot, tensor_state
from scaletrain.distributed.dims import ParallelDims


class PendingSave:
    """A checkpoint being written in the background; `latest` moves only when it completes."""

    def __init__(self, final: Path, thread: threading.Thread, errors: list[BaseException]) -> None:
        self.final, self._thread, self._errors = final, thread, errors

    def wait(self) -> Path:
        self._thread.join()
        if self._errors:
            raise CheckpointError(f"asynchronous save of {self.final} failed: {self._errors[0]}") from self._errors[0]
        return self.final


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], keep_last: int = 0, *, rank_state: dict[str, Any] | None = None,
                    dims: ParallelDims, tokenizer: str | Path | None = None,
                    async_save: bool = False) -> Path | PendingSave:
    """Write checkpoint `step` under `root` atomically and point `latest` at it; prune to `keep_last`.

    Collective when dims spans several processes: every rank writes its shards and
    `rank_<r>.json` (its `rank_state`, e.g. RNG); rank 0 writes `trainer_state`, a copy of the
    tokenizer (so the checkpoint exports on its own) and publishes. With `async_save` the state is
    copied now (in memory) and written by a background thread, whose collectives run on a process
    group of their own (`dims.comm('ckpt')`) so they never interleave with training's; the caller
    waits on the returned PendingSave before the next save and at the end.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    state, _groups = tensor_state(model, optimizer, dims)  # collective (ZeRO gathers): main thread
    if not async_save:
        _write(root, final, state, trainer_state, rank_state, dims, tokenizer, keep_last, comm="world")
        return final
    state = snapshot(state)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            _write(root, final, state, trainer_state, rank_state, dims, tokenizer, keep_last, comm="ckpt")
        except BaseException as e:  # reported by PendingSave.wait()
            errors.append(e)

    thread = threading.Thread(target=work, name=f"save-{final.name}", daemon=False)
    thread.start()
    return PendingSave(final, thread, errors)


def _write(root: Path, final: Path, state: dict[str, Any], trainer_state: dict[str, Any],
           rank_state: dict[str, Any] | None, dims: ParallelDims, tokenizer: str | Path | None, keep_last: int,
           comm: str) -> None:
    group = dims.comm(comm) if dims.world_size > 1 else None
    rank = dims.rank
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crashed save
            shutil.rmtree(tmp)
    if group is not None:
        group.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns when it runs without a process group
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True),
                 process_group=group.group if group is not None else None)
    (tmp / f"rank_{rank}.json").write_text(json.dumps(rank_state or {}))
    write_rank_part(tmp, rank)  # sha256 of this rank's shards, merged by rank 0 below
    if group is not None:
        group.barrier()
    if rank == 0:
        if tokenizer:
            copy_tokenizer(tokenizer, tmp / "tokenizer")
        (tmp / STATE_FILE).write_text(json.dumps({"step": int(final.name.split("_")[1]), **trainer_state}, indent=1))
        write_manifest(tmp)
        fsync_tree(tmp)
        # Fault injection for the crash-during-save test: hold the finished, unpublished directory.
        time.sleep(float(os.environ.get("SCALETRAIN_FAULT_SAVE_DELAY_S", "0")))
        _publish(root, tmp, final)
        if keep_last > 0:
            _prune(root, keep_last, protect=final.name)
    if group is not None:
        group.barrier()


def write_checkpoint_dir(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                         trainer_state: dict[str, Any], tokenizer: str | Path | None = None) -> Path:
    """Write one checkpoint directory at `path` itself (single process; atomic via a sibling temp dir)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new output directory.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    state, _ = tensor_state(model, optimizer, ParallelDims.single())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    if tokenizer:
        copy_tokenizer(tokenizer, tmp / "tokenizer")
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    write_manifest(tmp)
    fsync_tree(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory into place, then move `latest` (both atomic)."""
    if final.exists():  # re-saving a step (e.g. after resuming from it): swap, then drop the old copy
        old = root / f".{final.name}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n")
    with latest_tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(latest_tmp, root / LATEST)
    fsync_dir(root)


def _prune(root: Path, keep_last: int, protect: str) -> None:
    """Remove all but the newest `keep_last` checkpoints, never `protect` nor the newest good one."""
    good = newest_good(root)
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in steps[:-keep_last]:
        if p.name != protect and (good is None or p.name != good.name):
            shutil.rmtree(p, ignore_errors=True)


