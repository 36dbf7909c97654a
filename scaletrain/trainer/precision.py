"""Numerics of a run, resolved once: parameter dtype, (optional) autocast dtype, and where gradients and
the optimizer's master weights live.

bf16 runs default to Megatron's mixed-precision layout (precision.params = 'bf16'): weights and
activations in bf16, gradients accumulated across microbatches into fp32 main-grad buckets
(parallel/data_parallel.py), fp32 master weights and AdamW state in the optimizer
(parallel/distributed_optimizer.py, sharded over dp × cp with ZeRO-1). Autocast stays entered (it keeps
its fp32 op list, e.g. for the loss) but has no weight to cast, so it holds no cached bf16 copy of any
weight. precision.params = 'fp32' keeps the layout from before: fp32 weights under bf16 autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from scaletrain.config.schema import PrecisionConfig


@dataclass(frozen=True)
class Precision:
    """param_dtype: what the model's parameters are stored in; autocast_dtype: matmul compute dtype under
    torch.autocast (None: compute in param_dtype). Gradients and master weights are kept in
    `main_dtype` (at least float32)."""

    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    device_type: str
    reason: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """The one place mixed-precision autocast is entered (FP8 will be entered here too)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    @property
    def name(self) -> str:
        return str(self.autocast_dtype or self.param_dtype).removeprefix("torch.")

    @property
    def main_dtype(self) -> torch.dtype:
        """Gradient buckets and the optimizer's master weights: float32 for bf16 weights, else the weights'."""
        return torch.promote_types(self.param_dtype, torch.float32)

    @property
    def compute_dtype(self) -> torch.dtype:
        """What activations (residual stream, norm outputs, SP collectives, pipeline messages) travel in."""
        return self.autocast_dtype or self.param_dtype


def _bf16(cfg: PrecisionConfig, device_type: str, why: str) -> Precision:
    if cfg.params == "fp32":
        return Precision(torch.float32, torch.bfloat16, device_type, f"{why}: fp32 weights under bf16 autocast "
                         "(precision.params = 'fp32')")
    return Precision(torch.bfloat16, torch.bfloat16, device_type, f"{why}: bf16 weights and activations, fp32 main "
                     "grads, fp32 master weights and AdamW state in the optimizer")


def resolve_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    if cfg.dtype == "float64":
        return Precision(torch.float64, None, device.type, "float64 numerics (parity tests)")
    if cfg.dtype == "float32":
        return Precision(torch.float32, None, device.type, "requested float32")
    if cfg.dtype == "bfloat16":
        return _bf16(cfg, device.type, "requested bf16")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return _bf16(cfg, "cuda", "auto: bf16 on CUDA")
    return Precision(torch.float32, None, device.type, f"auto: float32 on {device.type}")
