"""FP8 on the torch backend through torchao's float8 training (precision.fp8_backend = 'torchao'),
the path torchtitan takes without Transformer Engine.

torchao converts `nn.Linear` modules; the role layers here are column/row-parallel linears with their
own collectives, so instead of swapping modules (which would rename parameters) each chosen layer gets
a `Float8Matmul` that runs its local GEMM through torchao's float8 autograd function — dynamic
scaling, 'tensorwise' or 'rowwise' recipe — while the layer keeps its parameters, names and tp/SP
collectives: state dicts, checkpoints and HF maps are those of a bf16 run. Training forwards only
(under no_grad the plain GEMM runs), as with Transformer Engine.

Which layers: the transformer blocks' linears, except those in precision.fp8_bf16_layers' first and last
blocks, those whose local GEMM has a dimension not divisible by 16 (an FP8 GEMM requirement), and —
with precision.fp8_skip_small — those torchao's size heuristics say would not gain (its
`_auto_filter_for_recipe`, asked about an `nn.Linear` of the local shape). The output head is never
converted (it stays in bf16, as in torchtitan and Megatron).

torchao's `emulate` mode (precision.fp8_emulate) runs the same casts and scales with a high-precision
GEMM, so the wiring is tested on CPU; on CUDA FP8 needs compute capability 8.9 (Ada/Hopper) or newer.
The version is pinned in pyproject.toml (torchao 0.18: torch ≥ 2.11, CI's oldest and newest torch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import cast

import torch

from scaletrain.config.schema import PrecisionConfig
from scaletrain.nn.linear import TPBound

RECIPES = {"current": "tensorwise", "tensorwise": "tensorwise", "rowwise": "rowwise"}


def float8_problem(cfg: PrecisionConfig, device: torch.device) -> str | None:
    """Why torchao's FP8 cannot run here (None when it can)."""
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:  # ImportError, or a torchao built for another torch
        return (f"precision.fp8_backend = 'torchao': cannot import torchao.float8 ({type(e).__name__}: {e}); "
                "pip install 'torchao>=0.18,<0.19'.")
    if cfg.fp8_emulate:
        return None
    if device.type != "cuda":
        return (f"precision.fp8_backend = 'torchao' needs an FP8 GPU (compute capability ≥ 8.9) and this run is on "
                f"{device.type}; set precision.fp8_emulate = true to emulate it (tests), or precision.fp8 = false.")
    if torch.cuda.get_device_capability(device) < (8, 9):
        return (f"precision.fp8: {torch.cuda.get_device_name(device)} has no FP8 tensor cores (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))} < 8.9); set precision.fp8 = false.")
    return None


class Float8Matmul:
    """y = x Wᵀ through torchao's float8 training autograd function (x [..., k], w [n, k] → [..., n])."""

    def __init__(self, config) -> None:
        from torchao.float8 import LinearMMConfig, ScaledMMConfig
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        self.config, self._fn = config, matmul_with_hp_or_float8_args
        # Output, grad-input and grad-weight GEMMs, as torchao's Float8Linear configures them.
        self.mm_config = LinearMMConfig(*(ScaledMMConfig(config.emulate, g.use_fast_accum, False, config.pad_inner_dim)
                                          for g in (config.gemm_config_output, config.gemm_config_grad_input,
                                                    config.gemm_config_grad_weight)))

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._fn.apply(x, w.t(), self.mm_config, self.config)


def float8_config(cfg: PrecisionConfig):
    """torchao's Float8LinearConfig for precision.fp8_recipe ('current' = 'tensorwise', or 'rowwise')."""
    from torchao.float8 import Float8LinearConfig

    return dataclasses.replace(Float8LinearConfig.from_recipe_name(RECIPES[cfg.fp8_recipe]), emulate=cfg.fp8_emulate)


def _size_filter(cfg: PrecisionConfig) -> Callable[[int, int], bool]:
    """(out_features, in_features) of a local GEMM → whether FP8 pays off there."""
    if not cfg.fp8_skip_small:
        return lambda n, k: n % 16 == 0 and k % 16 == 0
    from torchao.float8 import _auto_filter_for_recipe

    auto = _auto_filter_for_recipe(RECIPES[cfg.fp8_recipe], filter_fqns=[])
    return lambda n, k: bool(auto(torch.nn.Linear(k, n, bias=False, device="meta"), ""))


def apply_float8(model: torch.nn.Module, cfg: PrecisionConfig, device: torch.device) -> str:
    """Give the chosen role linears of `model` (this rank's blocks) a Float8Matmul; return a line for the log."""
    problem = float8_problem(cfg, device)
    if problem:
        raise RuntimeError(problem)
    config = float8_config(cfg)
    matmul = Float8Matmul(config)
    keep = _size_filter(cfg)
    n = cfg.fp8_bf16_layers
    total: int = model.cfg.num_layers  # type: ignore[union-attr,assignment]
    converted: list[str] = []
    skipped = 0
    for key, block in model.layers.items():  # type: ignore[union-attr,operator]
        if int(key) < n or int(key) >= total - n:
            continue
        for name, module in block.named_modules():
            if not isinstance(module, TPBound) or not hasattr(module, "weight"):
                continue
            weight = cast(torch.Tensor, module.weight)
            w = weight.flatten(0, 1) if getattr(module, "fused", 1) > 1 else weight
            if keep(w.shape[0], w.shape[1]):
                module.fp8_matmul = matmul
                converted.append(f"layers.{key}.{name}")
            else:
                skipped += 1
    return (f"fp8: torchao float8 {RECIPES[cfg.fp8_recipe]} recipe{' (emulated)' if cfg.fp8_emulate else ''}: "
            f"{len(converted)} linears converted, {skipped} too small or not divisible by 16 left in "
            f"{'bf16' if device.type == 'cuda' else 'high precision'}; the head stays out")


def fp8_linears(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose GEMM runs in FP8 through torchao (for tests and logs)."""
    return [name for name, m in model.named_modules() if getattr(m, "fp8_matmul", None) is not None]
