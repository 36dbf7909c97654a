"""Layout-independent, seeded parameter initialisation.

Each parameter carries a `ParamSpec` saying how to initialise its *full* (global) tensor and along
which dimension tensor parallelism splits it. `init_parameters` draws every full tensor from a
generator seeded by (run seed, parameter name) and copies out the local slice, so the same seed
gives the same full weights at every tp/pp layout and in any construction order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamSpec:
    """How a parameter is initialised and sharded.

    init: 'normal' (std), 'ones' or 'zeros'. shard_dim: the dim split over tp (None: replicated).
    global_shape: the full tensor's shape. view: the local tensor's logical shape where a backend
    stores it differently (Transformer Engine keeps the fused gate/up weight 2-D, [2·f/tp, h], while
    checkpoints, HF maps and the torch backend see [2, f/tp, h]; same memory, so a view).
    expert_slice: (first, count) along dim 0 for routed-expert weights sharded over expert parallelism
    (global_shape[0] is then every expert; set by parallel/expert_parallel.shard_experts).
    """

    init: str
    std: float
    shard_dim: int | None
    global_shape: tuple[int, ...]
    view: tuple[int, ...] | None = None
    expert_slice: tuple[int, int] | None = None


def mark(param: torch.nn.Parameter, init: str, std: float = 0.0, shard_dim: int | None = None,
         tp_size: int = 1, view: tuple[int, ...] | None = None) -> torch.nn.Parameter:
    """Attach a ParamSpec to `param` (local shape, or its logical local shape `view`) and return it."""
    shape = list(view or param.shape)
    if view is not None and param.numel() != torch.Size(view).numel():
        raise ValueError(f"view {view} does not fit a parameter of shape {tuple(param.shape)}")
    if shard_dim is not None:
        shape[shard_dim] *= tp_size
    param.scaletrain_spec = ParamSpec(init, std, shard_dim, tuple(shape), view)  # type: ignore[attr-defined]
    return param


def logical(t: torch.Tensor, spec: ParamSpec | None) -> torch.Tensor:
    """A parameter-shaped tensor (the parameter, its grad or optimizer state) in its logical local shape."""
    if spec is None or spec.view is None or tuple(t.shape) == spec.view:
        return t
    return t.view(spec.view)


def spec_of(param: torch.Tensor) -> ParamSpec:
    spec = getattr(param, "scaletrain_spec", None)
    if spec is None:
        raise TypeError("parameter was not created by a scaletrain.nn layer (no ParamSpec)")
    return spec


def expert_sharded(param: torch.Tensor) -> bool:
    """Whether `param` holds an ep slice of routed experts (its gradient is reduced over expert-dp)."""
    spec = getattr(param, "scaletrain_spec", None)
    return spec is not None and spec.expert_slice is not None


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def full_init(spec: ParamSpec, seed: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The full (unsharded) initial tensor of parameter `name`, on CPU."""
    if spec.init == "ones":
        return torch.ones(spec.global_shape, dtype=dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.global_shape, dtype=dtype)
    # Draw in float32 whatever the training dtype, so float32 and float64 runs start from the same weights.
    full = torch.empty(spec.global_shape, dtype=torch.float32).normal_(0.0, spec.std, generator=_generator(seed, name))
    return full.to(dtype)


@torch.no_grad()
def init_parameters(model: torch.nn.Module, seed: int, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Initialise every parameter of `model` in place from `seed`; tied parameters once."""
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        spec = spec_of(param)
        full = full_init(spec, seed, name, param.dtype)
        logical(param, spec).copy_(local_part(full, spec, tp_rank, tp_size).to(param.device))


def local_part(full: torch.Tensor, spec: ParamSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of a parameter's full tensor: its experts (expert parallelism), then its tp slice."""
    if spec.expert_slice is not None:
        full = full.narrow(0, *spec.expert_slice)
    if spec.shard_dim is not None and tp_size > 1:
        full = full.chunk(tp_size, dim=spec.shard_dim)[tp_rank]
    return full


def store_fused_flat(module: torch.nn.Module, fused: int) -> None:
    """For a layer that keeps a fused weight (and bias) flat, [fused·n, …], where the logical shape is
    [fused, n, …] (Transformer Engine's gate/up): its state_dict shows the logical shape and its
    load_state_dict accepts either. The ParamSpec's `view` covers checkpoints and initialisation."""

    def to_logical(mod, state_dict: dict, prefix: str, local_metadata) -> None:
        for name in ("weight", "bias"):
            t, own = state_dict.get(prefix + name), getattr(mod, name, None)
            if isinstance(t, torch.Tensor) and isinstance(own, torch.Tensor) and t.numel() and t.dim() == own.dim():
                state_dict[prefix + name] = t.view(fused, -1, *t.shape[1:])

    def to_storage(state_dict: dict, prefix: str, *args) -> None:
        for name in ("weight", "bias"):
            t = state_dict.get(prefix + name)
            own = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and isinstance(own, torch.Tensor) and t.dim() == own.dim() + 1:
                state_dict[prefix + name] = t.flatten(0, 1)

    module._register_state_dict_hook(to_logical)
    module._register_load_state_dict_pre_hook(to_storage)
