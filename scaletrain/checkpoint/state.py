"""A model's and optimizer's tensors as DCP sees them: FQN-keyed, in logical shapes, and under tp > 1 as
DTensors with their global shapes, so every file records global shapes and offsets (a resharding load)."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
from torch.distributed.tensor import DTensor, Shard

from scaletrain.distributed.dims import ParallelDims
from scaletrain.nn.init import logical, spec_of
from scaletrain.parallel.distributed_optimizer import DistributedOptimizer, materialize_optimizer_state


def _to_global(local: Any, spec, dims: ParallelDims) -> Any:
    """A tp-sharded local tensor as a DTensor with its global shape (plain tensors are replicated); routed
    experts under expert parallelism are sharded over ep along dim 0 (and over tp along their shard dim)."""
    if spec is None or local.ndim == 0:
        return local
    if spec.expert_slice is not None and dims.ep > 1:
        mesh, placements = dims.expert_mesh["ep"], [Shard(0)]
        if dims.tp > 1 and spec.shard_dim is not None:
            mesh, placements = dims.expert_mesh["ep", "tp"], [Shard(0), Shard(spec.shard_dim)]
    elif spec.shard_dim is None or dims.tp == 1:
        return local
    else:
        mesh, placements = dims.mesh["tp"], [Shard(spec.shard_dim)]
    shape = torch.Size(spec.global_shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


def _logical(t: Any, spec) -> Any:
    """Parameter-shaped tensors (not scalars like Adam's step) in their logical shape: a view, so DCP
    loads into the same memory."""
    if not isinstance(t, torch.Tensor) or spec is None or spec.view is None or t.numel() == 1:
        return t
    return logical(t, spec)


def is_zero(optimizer: Any) -> bool:
    return isinstance(optimizer, DistributedOptimizer)


def tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, dims: ParallelDims
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({'model': …, 'optim': {'state': …}}, FQN-keyed param groups) for DCP.

    Under tp > 1 sharded tensors become DTensors, so every file records global shapes and offsets.
    """
    groups: list[dict[str, Any]] = []
    model_sd: dict[str, Any]
    optim_state: dict[str, Any] | None
    if is_zero(optimizer):  # ZeRO-1: gathered into the plain optimizer's per-parameter form
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
    if dims.tp > 1 or dims.ep > 1:
        model_sd = {k: _to_global(v, specs.get(k), dims) for k, v in model_sd.items()}
        if optim_state is not None:
            optim_state = {fqn: {k: _to_global(v, specs.get(fqn), dims) for k, v in st.items()}
                           for fqn, st in optim_state.items()}
    out: dict[str, Any] = {"model": model_sd}
    if optim_state is not None:
        # param_groups hold hyper-parameters, which come from the config on resume; only state is saved.
        out["optim"] = {"state": optim_state}
    return out, groups


def local_tensors(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: local_tensors(v) for k, v in tree.items()}
    return tree.to_local() if isinstance(tree, DTensor) else tree


def snapshot(tree: Any) -> Any:
    """A copy of every tensor (DTensors keep their placement) that training may overwrite meanwhile."""
    if isinstance(tree, dict):
        return {k: snapshot(v) for k, v in tree.items()}
    if isinstance(tree, DTensor):
        return DTensor.from_local(tree.to_local().detach().clone(), tree.device_mesh, tree.placements,
                                  run_check=False, shape=tree.shape, stride=tree.stride())
    return tree.detach().clone() if isinstance(tree, torch.Tensor) else tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = v
    return out
