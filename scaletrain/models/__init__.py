"""Model families: pure architecture (and, per family, the Hugging Face key map)."""

from __future__ import annotations

import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.models.llama import LlamaModel


def build_model(cfg: ModelConfig, tp_size: int = 1, dtype: torch.dtype | None = None,
                backend: str = "torch") -> torch.nn.Module:
    """Construct the (uninitialised) model of `cfg.family` with tp-local shapes, from the layer
    classes of `backend` ('torch' or 'te'; see scaletrain.nn.backend)."""
    if cfg.family == "llama":
        return LlamaModel(cfg, tp_size=tp_size, dtype=dtype, backend=backend)
    raise ValueError(f"unknown model family {cfg.family!r}; known: llama")
