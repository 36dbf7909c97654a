"""Choice of the layer backend, made once per run and logged with its reason (DESIGN rule 4).

Both backends build the same role vocabulary — column/row-parallel linear, RMSNorm, core attention —
with identical parameter names and (logical) shapes, so checkpoints and HF maps never know which
one trained a model. 'te' is Transformer Engine on CUDA (nn/te_backend.py); 'torch' is plain PyTorch
and runs everywhere.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from scaletrain.nn.attention import CoreAttention
from scaletrain.nn.linear import ColumnParallelLinear, RowParallelLinear
from scaletrain.nn.norm import RMSNorm


def te_importable() -> tuple[bool, str]:
    """(True, version) when transformer_engine.pytorch imports; (False, why) otherwise."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False, "transformer_engine is not installed (pip install -e '.[gpu]' on a CUDA machine)"
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401  (loads the CUDA extension)
    except Exception as e:  # a broken install (CUDA/torch mismatch) raises anything from OSError to RuntimeError
        return False, f"transformer_engine is installed but does not import: {type(e).__name__}: {e}"
    return True, getattr(transformer_engine, "__version__", "unknown")


def select_backend(requested: str, kernels: tuple[str, ...] = ()) -> tuple[str, str]:
    """Return (backend, reason) for parallel.backend = auto | torch | te.

    'te' is refused where it cannot run; 'auto' picks te only where CUDA is visible and Transformer
    Engine imports (and no torch-backend kernels were asked for), and says why otherwise.
    """
    if requested == "torch":
        return "torch", "requested"
    has_cuda = torch.cuda.is_available()
    if requested == "auto" and kernels:
        return "torch", "auto: parallel.kernels are the torch backend's fused kernels"
    if requested == "te":
        if not has_cuda:
            raise RuntimeError("parallel.backend = 'te' needs CUDA, and this machine has none; use 'torch'.")
        ok, detail = te_importable()
        if not ok:
            raise RuntimeError(f"parallel.backend = 'te': {detail}; or use parallel.backend = 'torch'.")
        return "te", f"requested (Transformer Engine {detail})"
    if not has_cuda:
        return "torch", "auto: no CUDA device"
    ok, detail = te_importable()
    if not ok:
        return "torch", f"auto: {detail}"
    return "te", f"auto: CUDA and Transformer Engine {detail}"


@dataclass(frozen=True)
class Roles:
    """The layer classes a model is written with, for one backend."""

    column: type
    row: type
    norm: type
    attention: type


def roles(backend: str) -> Roles:
    """The role classes of `backend` ('torch' or 'te'; te imports Transformer Engine here, not before)."""
    if backend == "torch":
        return Roles(ColumnParallelLinear, RowParallelLinear, RMSNorm, CoreAttention)
    if backend == "te":
        from scaletrain.nn import te_backend

        return Roles(te_backend.TEColumnParallelLinear, te_backend.TERowParallelLinear, te_backend.TERMSNorm,
                     te_backend.TECoreAttention)
    raise ValueError(f"unknown backend {backend!r}; known: torch, te")
