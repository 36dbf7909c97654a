"""Choice of the layer backend, made once per run and logged with its reason (DESIGN rule 4)."""

from __future__ import annotations

import importlib.util

import torch


def select_backend(requested: str) -> tuple[str, str]:
    """Return (backend, reason) for parallel.backend = auto | torch | te.

    'te' is refused where it cannot run; 'auto' never silently claims Transformer Engine.
    """
    has_cuda = torch.cuda.is_available()
    has_te = importlib.util.find_spec("transformer_engine") is not None
    if requested == "torch":
        return "torch", "requested"
    if requested == "te":
        if not has_cuda:
            raise RuntimeError("parallel.backend = 'te' needs CUDA, and this machine has none; use 'torch'.")
        if not has_te:
            raise RuntimeError("parallel.backend = 'te' needs transformer_engine: pip install -e '.[gpu]'.")
        raise RuntimeError("parallel.backend = 'te' is not implemented in this build yet; use 'torch'.")
    if not has_cuda:
        return "torch", "auto: no CUDA device"
    if not has_te:
        return "torch", "auto: transformer_engine is not installed"
    return "torch", "auto: the te backend is not implemented in this build yet"
