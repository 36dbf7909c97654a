"""The one door from scaletrain.nn to the fused Triton kernels (package scaletrain_kernels, folder kernels/).

`parallel.kernels` names the kernels a run uses; `enable_kernels` (called by parallelize) marks the
role layers that then call them. Unselected, every layer runs its torch reference. Kernels are
imported only when a selected layer first runs, so CPU runs never import Triton.
"""

from __future__ import annotations

import torch

KERNELS = ("rmsnorm", "rope", "swiglu", "cross_entropy")


def expand(names: tuple[str, ...]) -> tuple[str, ...]:
    return KERNELS if "all" in names else tuple(names)


def check_available(names: tuple[str, ...], device_type: str) -> str | None:
    """None when the selected kernels can run on `device_type`; otherwise what to change."""
    if not names:
        return None
    try:
        import scaletrain_kernels
    except ImportError:
        return "parallel.kernels is set but the scaletrain_kernels package is not installed (pip install -e .)"
    reason = scaletrain_kernels.unavailable_reason(device_type)
    return None if reason is None else f"parallel.kernels = {list(names)}: {reason}; or set parallel.kernels = []"


def enable_kernels(model: torch.nn.Module, names: tuple[str, ...]) -> list[str]:
    """Mark every layer whose kernel is selected (`module.fused_kernel` names it); returns the kernels used."""
    selected = set(expand(names))
    used = set()
    for module in model.modules():
        kernel = getattr(module, "fused_kernel", None)
        if kernel in selected:
            setattr(module, "use_fused", True)  # noqa: B010 (nn.Module attributes are typed as tensors/modules)
            used.add(kernel)
    return sorted(used)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from scaletrain_kernels.rmsnorm import rmsnorm as kernel

    return kernel(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from scaletrain_kernels.swiglu import swiglu as kernel

    return kernel(gate, up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    from scaletrain_kernels.rope import rope as kernel

    return kernel(x, cos, sin, positions)
