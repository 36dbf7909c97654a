"""Rotary position embedding in the rotate-half layout (the Hugging Face / Megatron default).

Using rotate-half means Hugging Face q/k weights map over without a row permutation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scaletrain.nn import fused


def rope_inv_freq(head_dim: int, theta: float, scaling: str = "none", factor: float = 8.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_position: int = 8192) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float64; 'llama3' applies Llama 3.1's band-wise scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling == "none":
        return inv
    if scaling != "llama3":
        raise ValueError(f"unknown rope scaling {scaling!r}")
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates q and k of shape [b, s, heads, d] by position.

    cos/sin tables are built lazily for the longest position seen (not for max_position up front:
    a 128k-context config would otherwise hold two 128k × d float64 tables per model).
    """

    fused_kernel = "rope"  # parallel.kernels name of the fused version (scaletrain.nn.fused)

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: str = "none", **scaling_args: float) -> None:
        super().__init__()
        self.max_position = max_position
        self._freq_args = (head_dim, theta, scaling, scaling_args)
        # Non-persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling, **scaling_args),  # type: ignore[arg-type]
                             persistent=False)
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.use_fused = False

    def reset_buffers(self) -> None:
        """Recompute the frequencies (after a meta-device model is materialised)."""
        head_dim, theta, scaling, args = self._freq_args
        device = self.inv_freq.device  # type: ignore[has-type]
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling, **args).to(device)  # type: ignore[arg-type]
        self._tables = None

    def _cos_sin(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tables is None or self._tables[0].shape[0] < length or self._tables[0].device != device:
            if length > self.max_position:
                raise ValueError(f"position {length - 1} exceeds max_position_embeddings = {self.max_position}")
            angles = torch.outer(torch.arange(length, dtype=torch.float64, device=device),
                                 self.inv_freq.to(device, torch.float64))  # type: ignore[operator,arg-type]
            emb = torch.cat((angles, angles), dim=-1)
            self._tables = (emb.cos(), emb.sin())
        return self._tables

    def _traced_cos_sin(self, s: int, position_ids: torch.Tensor | None, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [b or 1, s, 1, d] built inside a compiled graph from the positions themselves: the
        table cache is module state that dynamo cannot mutate under activation checkpointing (a
        recomputed forward would not replay it), and the packed path's max-position host sync would
        break the graph. The same float64 products as the table, fused by inductor."""
        positions = torch.arange(s, device=device)[None] if position_ids is None else position_ids
        angles = positions[..., None].to(torch.float64) * self.inv_freq.to(device, torch.float64)  # type: ignore[operator]
        emb = torch.cat((angles, angles), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] (default arange(s)) let packed documents restart at position 0."""
        s = q.shape[1]
        if self.use_fused:
            length = s if position_ids is None else int(position_ids.max()) + 1  # host sync, packed inputs only
            cos, sin = (t.float() for t in self._cos_sin(length, q.device))
            positions = position_ids if position_ids is not None else \
                torch.arange(s, device=q.device).expand(q.shape[0], s)
            return fused.rope(q, cos, sin, positions), fused.rope(k, cos, sin, positions)
        if torch.compiler.is_compiling():
            cos, sin = self._traced_cos_sin(s, position_ids, q.device)
        elif position_ids is None:
            cos, sin = self._cos_sin(s, q.device)
            cos, sin = cos[:s][None, :, None, :], sin[:s][None, :, None, :]
        else:
            cos, sin = self._cos_sin(int(position_ids.max()) + 1, q.device)  # host sync, packed inputs only
            cos, sin = cos[position_ids][:, :, None, :], sin[position_ids][:, :, None, :]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
