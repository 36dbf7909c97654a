"""Atomic checkpoints through torch.distributed.checkpoint (DCP), stored as safetensors.

Layout of a run directory's checkpoints:

    checkpoints/
      latest                      text: the name of the newest *complete* checkpoint
      step_0000200/
        shard-*.safetensors       model and optimizer tensors (DCP, Hugging Face safetensors storage)
        trainer_state.json        step, consumed samples, RNG states, config — written last
        checksums.json            sha256 and size of every shard, verified at load (checkpoint/checksums.py)

Tensors go through DCP with its safetensors storage, which records each tensor's global offsets in
the file headers: loading executes no pickled code (DCP's default `.metadata` is a pickle) and
the same files serve a resharding load later. A save writes into a hidden temporary directory,
fsyncs it, renames it into place and only then rewrites `latest` (itself via rename), so a crash
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

from scaletrain.checkpoint.checksums import verify_checkpoint, write_manifest, write_rank_part
from scaletrain.parallel.distributed_optimizer import DistributedOptimizer, materialize_optimizer_state

LATEST = "latest"
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this run; the message says why and what to do."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_dir():
            _fsync_tree(f)
        elif f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _to_global(local: Any, spec, dims) -> Any:
    """A tp-sharded local tensor as a DTensor with its global shape (plain tensors are replicated)."""
    if spec is None or spec.shard_dim is None or local.ndim == 0:
        return local
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size(spec.global_shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, dims.mesh["tp"], [Shard(spec.shard_dim)], run_check=False,
                              shape=shape, stride=stride)


def _logical(t: Any, spec) -> Any:
    """Parameter-shaped tensors (not scalars like Adam's step) in their logical shape: a view, so DCP
    loads into the same memory."""
    from scaletrain.nn.init import logical

    if not isinstance(t, torch.Tensor) or spec is None or spec.view is None or t.numel() == 1:
        return t
    return logical(t, spec)


def _is_zero(optimizer: Any) -> bool:
    return isinstance(optimizer, DistributedOptimizer)


def _tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, dims=None
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({'model': …, 'optim': {'state': …}}, FQN-keyed param groups) for DCP.

    Under tp > 1 sharded tensors become DTensors, so every file records global shapes and offsets.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    from scaletrain.nn.init import spec_of

    groups: list[dict[str, Any]] = []
    model_sd: dict[str, Any]
    optim_state: dict[str, Any] | None
    if _is_zero(optimizer):  # ZeRO-1: gathered into the plain optimizer's per-parameter form
        optimizer.materialize()  # type: ignore[union-attr]
        model_sd, optim_state = dict(get_model_state_dict(model)), optimizer.full_state()  # type: ignore[union-attr]
    elif optimizer is None:
        model_sd, optim_state = dict(get_model_state_dict(model)), None
    else:
        materialize_optimizer_state(optimizer)
        msd, optim_sd = get_state_dict(model, optimizer)
        model_sd = dict(msd)
        optim_state, groups = dict(optim_sd["state"]), list(optim_sd["param_groups"])  # type: ignore[arg-type,call-overload]
    specs = {name: spec_of(p) for name, p in model.named_parameters()}
    if any(s.view is not None for s in specs.values()):  # a backend's storage shape → the logical one
        model_sd = {k: _logical(v, specs.get(k)) for k, v in model_sd.items()}
        if optim_state is not None:
            optim_state = {fqn: {k: _logical(v, specs.get(fqn)) for k, v in st.items()}
                           for fqn, st in optim_state.items()}
    if dims is not None and dims.tp > 1:
        model_sd = {k: _to_global(v, specs.get(k), dims) for k, v in model_sd.items()}
        if optim_state is not None:
            optim_state = {fqn: {k: _to_global(v, specs.get(fqn), dims) for k, v in st.items()}
                           for fqn, st in optim_state.items()}
    out: dict[str, Any] = {"model": model_sd}
    if optim_state is not None:
        # param_groups hold hyper-parameters, which come from the config on resume; only state is saved.
        out["optim"] = {"state": optim_state}
    return out, groups


def _local(tree: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(tree, dict):
        return {k: _local(v) for k, v in tree.items()}
    return tree.to_local() if isinstance(tree, DTensor) else tree


def _snapshot(tree: Any) -> Any:
    """A copy of every tensor (DTensors keep their placement) that training may overwrite meanwhile."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, dict):
        return {k: _snapshot(v) for k, v in tree.items()}
    if isinstance(tree, DTensor):
        return DTensor.from_local(tree.to_local().detach().clone(), tree.device_mesh, tree.placements,
                                  run_check=False, shape=tree.shape, stride=tree.stride())
    return tree.detach().clone() if isinstance(tree, torch.Tensor) else tree


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
                    dims=None, tokenizer: str | Path | None = None, async_save: bool = False) -> Path | PendingSave:
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
    state, _groups = _tensor_state(model, optimizer, dims)  # collective (ZeRO gathers): main thread
    if not async_save:
        _write(root, final, state, trainer_state, rank_state, dims, tokenizer, keep_last, comm="world")
        return final
    state = _snapshot(state)
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
           rank_state: dict[str, Any] | None, dims, tokenizer, keep_last: int, comm: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    group = dims.comm(comm) if dims is not None and dims.world_size > 1 else None
    rank = dims.rank if dims is not None else 0
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
            from scaletrain.checkpoint.hf import copy_tokenizer

            copy_tokenizer(tokenizer, tmp / "tokenizer")
        (tmp / STATE_FILE).write_text(json.dumps({"step": int(final.name.split("_")[1]), **trainer_state}, indent=1))
        write_manifest(tmp)
        _fsync_tree(tmp)
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
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new output directory.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    state, _ = _tensor_state(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    if tokenizer:
        from scaletrain.checkpoint.hf import copy_tokenizer

        copy_tokenizer(tokenizer, tmp / "tokenizer")
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    write_manifest(tmp)
    _fsync_tree(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
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
    _fsync_dir(root)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n")
    with latest_tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)


def _prune(root: Path, keep_last: int, protect: str) -> None:
    """Remove all but the newest `keep_last` checkpoints, never `protect` nor the newest good one."""
    from scaletrain.checkpoint.select import newest_good

    good = newest_good(root)
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in steps[:-keep_last]:
        if p.name != protect and (good is None or p.name != good.name):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: str | Path, *, warn: bool = False) -> Path | None:
    """The checkpoint `latest` names under `root`, or None if there is none yet. Where `latest` is missing
    or not a file, the newest complete checkpoint (checkpoint/select.py). `warn`: say so on stderr, and
    when the checkpoint is not good."""
    from scaletrain.checkpoint.select import warn_if_not_good, without_pointer

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


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} is not a complete scaletrain checkpoint (no {STATE_FILE}).")
    return _read_json(f)


def _read_json(f: Path) -> dict[str, Any]:
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


def _stored_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key → (global shape, dtype) from the safetensors headers (no tensor data read).

    A tensor saved by several ranks has one slice per file; its global shape is the furthest
    extent of any slice (offsets from DCP's sharding info in each header).
    """
    from safetensors import safe_open

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


_DTYPE_NAMES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}


def stored_param_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint's model tensors were saved in (a frozen model is loaded in it, then cast)."""
    names = {v: k for k, v in _DTYPE_NAMES.items()}
    dtypes = {d for k, (_, d) in _stored_tensors(Path(path)).items() if k.startswith("model.")}
    if len(dtypes) != 1 or next(iter(dtypes)) not in names:
        raise CheckpointError(f"checkpoint {path}: model tensors in {sorted(dtypes) or 'no'} dtype(s); expected one of "
                              f"{', '.join(names)}")
    return names[dtypes.pop()]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = v
    return out


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    *, dims=None) -> dict[str, Any]:
    """Load tensors into `model` (and `optimizer`) in place; return the trainer state, with this
    rank's `rank_state` under the key 'rank_state' (absent if the checkpoint has none for it).

    Missing or unexpected keys and global shape or dtype mismatches fail before anything is copied.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    state = read_trainer_state(path)
    world = dims.world_size if dims is not None else 1
    verify_checkpoint(path, rank=dims.rank if dims is not None else 0, world_size=world,
                      comm=dims.comm("world") if world > 1 else None, error=CheckpointError)
    stored = _stored_tensors(path)
    target, groups = _tensor_state(model, optimizer, dims)
    flat = _flatten(target)
    if optimizer is None:
        stored = {k: v for k, v in stored.items() if not k.startswith("optim.")}
    missing = sorted(set(flat) - set(stored))
    # Under pipeline parallelism each rank loads only its stage: a key is unexpected only if no
    # rank of this run holds it.
    wanted = set(flat)
    if dims is not None and dims.pp > 1:
        wanted = set().union(*dims.comm("world").all_gather_object(sorted(flat)))  # type: ignore[arg-type]
    unexpected = sorted(set(stored) - wanted)
    wrong = [f"{k}: checkpoint {stored[k][0]} {stored[k][1]}, model {tuple(t.shape)} {_DTYPE_NAMES.get(t.dtype, t.dtype)}"
             for k, t in flat.items() if k in stored and (stored[k][0] != tuple(t.shape)
                                                          or stored[k][1] != _DTYPE_NAMES.get(t.dtype, stored[k][1]))]
    if missing or unexpected or wrong:
        lines = ([f"missing from checkpoint: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}"] if missing else [])
        lines += [f"not in this model: {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}"] if unexpected else []
        lines += [f"shape/dtype mismatch: {w}" for w in wrong[:8]]
        raise CheckpointError(f"checkpoint {path} does not fit this run's model/optimizer (same model config and "
                              "precision.dtype as the run that saved it?):\n  " + "\n  ".join(lines))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dims None: this process loads the whole model on its own (export, chat), even where a
        # process group exists; DCP would otherwise coordinate the load over that group.
        dcp.load(target, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=dims is None)
    target = _local(target)
    if "optim" in target:  # optimizer state back from logical views to the shapes the optimizer steps with
        # (model tensors need no such step: a flat-storing layer's load_state_dict hook takes either shape)
        shapes = {n: p.shape for n, p in model.named_parameters()}
        target["optim"]["state"] = {
            fqn: {k: v.reshape(shapes[fqn]) if isinstance(v, torch.Tensor) and fqn in shapes and v.numel() > 1 else v
                  for k, v in st.items()} for fqn, st in target["optim"]["state"].items()}
    if optimizer is None:
        model.load_state_dict(target["model"])
    elif _is_zero(optimizer):
        model.load_state_dict(target["model"])
        optimizer.load_full_state(target["optim"]["state"])  # type: ignore[attr-defined]
    else:
        set_state_dict(model, optimizer, model_state_dict=target["model"],
                       optim_state_dict={"state": target["optim"]["state"], "param_groups": groups})
    rank_file = path / f"rank_{dims.rank if dims is not None else 0}.json"
    if rank_file.is_file():
        state["rank_state"] = _read_json(rank_file)
    return state
