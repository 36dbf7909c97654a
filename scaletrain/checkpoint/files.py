"""What a checkpoint directory holds and how its files are read: names, the trainer state, the safetensors
headers (global shapes and dtypes, no tensor data), the tokenizer copy; fsync helpers for writers.

    checkpoints/
      latest                      text: the name of the newest *complete* checkpoint
      step_0000200/
        shard-*.safetensors       model and optimizer tensors (DCP, Hugging Face safetensors storage)
        trainer_state.json        step, consumed samples, RNG states, config — written last
        rank_<r>.json             each rank's own state (RNG)
        checksums.json            sha256 and size of every shard, verified at load (checkpoint/checksums.py)
        tokenizer/                the tokenizer the run trained with (the checkpoint exports on its own)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

LATEST = "latest"
STATE_FILE = "trainer_state.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json", "chat_template.json")
TOKENIZER_DIRS = ("additional_chat_templates",)  # named chat templates (transformers ≥ 4.5x)
DTYPE_NAMES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this run; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_tokenizer(src: str | Path, dst: Path) -> bool:
    """Copy the tokenizer files of `src` (a folder or a tokenizer file inside one) into `dst`."""
    folder = Path(src)
    folder = folder if folder.is_dir() else folder.parent
    found = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not found:
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for f in found:
        shutil.copy2(f, dst / f.name)
    for d in TOKENIZER_DIRS:
        if (folder / d).is_dir():
            shutil.copytree(folder / d, dst / d, dirs_exist_ok=True)
    return True


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} is not a complete scaletrain checkpoint (no {STATE_FILE}).")
    return read_json(f)


def read_json(f: Path) -> dict[str, Any]:
    """A checkpoint's JSON file; invalid JSON is a CheckpointError naming the file."""
    try:
        out = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the checkpoint is corrupt — resume from an earlier "
                              "step_* directory (edit `latest`).") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{f} holds no JSON object; the checkpoint is corrupt — resume from an earlier "
                              "step_* directory (edit `latest`).")
    return out


def stored_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key → (global shape, dtype) from the safetensors headers (no tensor data read).

    A tensor saved by several ranks has one slice per file; its global shape is the furthest
    extent of any slice (offsets from DCP's sharding info in each header).
    """
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors files; the checkpoint is incomplete or corrupt.")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                sharding = json.loads((fh.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    offsets = sharding.get(key, {}).get("saved_offsets") or [0] * len(sl.get_shape())
                    extent = tuple(o + n for o, n in zip(offsets, sl.get_shape()))
                    if key in out:
                        extent = tuple(max(a, b) for a, b in zip(out[key][0], extent))
                    out[key] = (extent, sl.get_dtype())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f} cannot be read ({e}); the checkpoint is corrupt — resume from an "
                                  "earlier step_* directory (edit `latest`).") from e
    return out


def stored_param_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint's model tensors were saved in (a frozen model is loaded in it, then cast)."""
    names = {v: k for k, v in DTYPE_NAMES.items()}
    dtypes = {d for k, (_, d) in stored_tensors(Path(path)).items() if k.startswith("model.")}
    if len(dtypes) != 1 or next(iter(dtypes)) not in names:
        raise CheckpointError(f"checkpoint {path}: model tensors in {sorted(dtypes) or 'no'} dtype(s); expected one of "
                              f"{', '.join(names)}")
    return names[dtypes.pop()]
