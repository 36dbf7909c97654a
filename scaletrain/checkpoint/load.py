"""Loading a checkpoint saved at any layout into this run's model (and optimizer): verified (checksums, keys,
global shapes and dtypes, all before anything is copied), then DCP reshards it onto this rank's slices."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.state_dict import set_state_dict

from scaletrain.checkpoint.checksums import verify_checkpoint
from scaletrain.checkpoint.files import (
    DTYPE_NAMES,
    CheckpointError,
    read_json,
    read_trainer_state,
    stored_tensors,
)
from scaletrain.checkpoint.state import flatten, is_zero, local_tensors, tensor_state
from scaletrain.distributed.dims import ParallelDims


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    *, dims: ParallelDims) -> dict[str, Any]:
    """Load tensors into `model` (and `optimizer`) in place; return the trainer state, with this
    rank's `rank_state` under the key 'rank_state' (absent if the checkpoint has none for it).

    Missing or unexpected keys and global shape or dtype mismatches fail before anything is copied.
    """
    path = Path(path)
    state = read_trainer_state(path)
    world = dims.world_size
    verify_checkpoint(path, rank=dims.rank, world_size=world, comm=dims.comm("world") if world > 1 else None,
                      error=CheckpointError)
    stored = stored_tensors(path)
    target, groups = tensor_state(model, optimizer, dims)
    flat = flatten(target)
    if optimizer is None:
        stored = {k: v for k, v in stored.items() if not k.startswith("optim.")}
    missing = sorted(set(flat) - set(stored))
    # Under pipeline parallelism each rank loads only its stage: a key is unexpected only if no
    # rank of this run holds it.
    wanted = set(flat)
    if dims.pp > 1:
        wanted = set().union(*dims.comm("world").all_gather_object(sorted(flat)))  # type: ignore[arg-type]
    unexpected = sorted(set(stored) - wanted)
    wrong = [f"{k}: checkpoint {stored[k][0]} {stored[k][1]}, model {tuple(t.shape)} {DTYPE_NAMES.get(t.dtype, t.dtype)}"
             for k, t in flat.items() if k in stored and (stored[k][0] != tuple(t.shape)
                                                          or stored[k][1] != DTYPE_NAMES.get(t.dtype, stored[k][1]))]
    if missing or unexpected or wrong:
        lines = ([f"missing from checkpoint: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}"] if missing else [])
        lines += [f"not in this model: {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}"] if unexpected else []
        lines += [f"shape/dtype mismatch: {w}" for w in wrong[:8]]
        raise CheckpointError(f"checkpoint {path} does not fit this run's model/optimizer (same model config and "
                              "precision.dtype as the run that saved it?):\n  " + "\n  ".join(lines))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # One process (export, chat, a single-process run): it loads the whole model on its own, even where a
        # process group exists; DCP would otherwise coordinate the load over that group.
        dcp.load(target, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=dims.world_size == 1)
    target = local_tensors(target)
    if "optim" in target:  # optimizer state back from logical views to the shapes the optimizer steps with
        # (model tensors need no such step: a flat-storing layer's load_state_dict hook takes either shape)
        shapes = {n: p.shape for n, p in model.named_parameters()}
        target["optim"]["state"] = {
            fqn: {k: v.reshape(shapes[fqn]) if isinstance(v, torch.Tensor) and fqn in shapes and v.numel() > 1 else v
                  for k, v in st.items()} for fqn, st in target["optim"]["state"].items()}
    if optimizer is None:
        model.load_state_dict(target["model"])
    elif is_zero(optimizer):
        model.load_state_dict(target["model"])
        optimizer.load_full_state(target["optim"]["state"])  # type: ignore[attr-defined]
    else:
        set_state_dict(model, optimizer, model_state_dict=target["model"],
                       optim_state_dict={"state": target["optim"]["state"], "param_groups": groups})
    rank_file = path / f"rank_{dims.rank}.json"
    if rank_file.is_file():
        state["rank_state"] = read_json(rank_file)
    return state
