"""RMSNorm (Llama): y = x / rms(x) · weight, computed in float32 for low-precision inputs."""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.nn import fused
from scaletrain.nn.init import mark


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim.

    Placement: input and output have the same placement (replicated, or sequence-sharded under
    sequence parallelism); the weight is replicated over tp.
    """

    fused_kernel = "rmsnorm"  # parallel.kernels name of the fused version (scaletrain.nn.fused)

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.use_fused = False
        self.weight = mark(nn.Parameter(torch.empty(hidden_size, dtype=dtype)), "ones")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused:
            return fused.rmsnorm(x, self.weight, self.eps)
        # Upcast so bf16 activations do not lose the mean-square; float64 stays float64.
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(compute)).to(x.dtype)
