"""Numerics of a run, resolved once: parameter dtype and (optional) autocast dtype."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from scaletrain.config.schema import PrecisionConfig


@dataclass(frozen=True)
class Precision:
    """param_dtype: what parameters, grads and optimizer state are stored in; autocast_dtype: matmul
    compute dtype under torch.autocast (None: compute in param_dtype)."""

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


def resolve_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    if cfg.dtype == "float64":
        return Precision(torch.float64, None, device.type, "float64 numerics (parity tests)")
    if cfg.dtype == "float32":
        return Precision(torch.float32, None, device.type, "requested float32")
    if cfg.dtype == "bfloat16":
        return Precision(torch.float32, torch.bfloat16, device.type, "requested bf16 autocast, fp32 master weights")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return Precision(torch.float32, torch.bfloat16, "cuda", "auto: bf16 autocast on CUDA, fp32 master weights")
    return Precision(torch.float32, None, device.type, f"auto: float32 on {device.type}")
