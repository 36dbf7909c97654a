"""Checksums of a checkpoint's tensor shards: written at save, verified at load.

A flipped bit in a shard is otherwise invisible: safetensors checks its header, not its data, so a
resumed run would train from a silently wrong weight (or NaN). Every save records the sha256 and size
of each `*.safetensors` file in `checksums.json` inside the step directory, so the manifest is
published by the same rename as the shards it describes. Each rank hashes the files it wrote
(DCP names rank r's files `shard-<r+1>-…`) and leaves its part beside them; rank 0 merges the parts
(hashing any file no part covers) before the directory is fsynced and renamed. Each file is read
once, streamed (`hashlib.file_digest`).

At load every rank verifies a share of the files (file i on rank i mod world), and the results are
gathered, so all ranks fail together, naming the file. A checkpoint without `checksums.json` (saved by
an older scaletrain) still loads, with a notice.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

MANIFEST = "checksums.json"
ALGORITHM = "sha256"


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    return {ALGORITHM: file_digest(path), "bytes": path.stat().st_size}


def _part(tmp: Path, rank: int) -> Path:
    return tmp / f".{MANIFEST}.rank_{rank}"


def write_rank_part(tmp: Path, rank: int) -> None:
    """Hash the shards this rank wrote into `tmp` (call after the save, before the barrier)."""
    entries = {f.name: _entry(f) for f in sorted(tmp.glob(f"shard-{rank + 1:05d}-*.safetensors"))}
    _part(tmp, rank).write_text(json.dumps(entries))


def write_manifest(tmp: Path) -> None:
    """Rank 0, once every rank's part is written: merge them into `checksums.json` (hashing any shard
    no part names, e.g. a single-process save) and remove the parts."""
    files: dict[str, Any] = {}
    for part in sorted(tmp.glob(f".{MANIFEST}.rank_*")):
        files.update(json.loads(part.read_text()))
        part.unlink()
    for f in sorted(tmp.glob("*.safetensors")):
        if f.name not in files:
            files[f.name] = _entry(f)
    (tmp / MANIFEST).write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1))


def _problems(path: Path, files: dict[str, Any], names: list[str]) -> list[str]:
    out = []
    for name in names:
        f = path / name
        want = files[name]
        if not f.is_file():
            out.append(f"{f} is missing (listed in {MANIFEST})")
            continue
        size = f.stat().st_size
        if size != want.get("bytes"):
            detail = f"{size} bytes, {want.get('bytes')} when saved"
        elif file_digest(f) != want.get(ALGORITHM):
            detail = f"its {ALGORITHM} differs from the one in {MANIFEST}"
        else:
            continue
        out.append(f"{f} cannot be read as it was saved ({detail}): the file is corrupt")
    return out


def verify_checkpoint(path: Path, *, rank: int = 0, world_size: int = 1, comm=None, error=RuntimeError) -> bool:
    """Check `path`'s shards against its manifest; raise `error` naming every damaged file.

    With `comm` (a Comm over the `world_size` ranks that load together) each rank hashes its share
    and the findings are all-gathered. Returns False (after a notice on rank 0) for a checkpoint
    saved without checksums.
    """
    manifest = path / MANIFEST
    if not manifest.is_file():
        if rank == 0:
            print(f"notice: {path} has no {MANIFEST} (saved by an older scaletrain): its shards are loaded "
                  "without verification; the next save writes checksums.", file=sys.stderr, flush=True)
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise error(f"{manifest} is corrupt ({e}); the checkpoint cannot be verified — resume from an earlier "
                    "step_* directory (edit `latest`).") from None
    names = sorted(files)
    problems = [f"{f} is not listed in {MANIFEST} (not part of the checkpoint as saved)"
                for f in sorted(path.glob("*.safetensors")) if f.name not in files] if rank == 0 else []
    problems += _problems(path, files, names[rank::world_size])
    if comm is not None and world_size > 1:
        problems = [p for part in comm.all_gather_object(problems) for p in part]
    if problems:
        raise error(f"checkpoint {path} is corrupt:\n  " + "\n  ".join(problems)
                    + "\nresume from an earlier step_* directory (edit `latest`), or restore the file(s).")
    return True
