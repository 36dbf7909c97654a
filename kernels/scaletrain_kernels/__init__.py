"""scaletrain_kernels: fused Triton kernels, each paired with its torch reference.

Installed as `scaletrain_kernels` (the folder is kernels/ in the repository; the name avoids PyPI's
`kernels` package). Reached only through scaletrain.nn, selected by `parallel.kernels`. Every kernel
is a torch custom op with a registered autograd formula and fake (meta) implementation, so it
composes with autograd and torch.compile. Triton runs on CUDA; with TRITON_INTERPRET=1 its
interpreter runs the same kernels on CPU tensors, which is how CPU tests check them.
"""

from __future__ import annotations

import importlib.util
import os

KERNELS = ("rmsnorm", "rope", "swiglu", "cross_entropy")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device_type: str) -> str | None:
    """Why the kernels cannot run on `device_type` here (None: they can)."""
    if not triton_available():
        return "triton is not installed (pip install triton; CUDA builds of torch ship it)"
    if device_type != "cuda" and not interpreting():
        return (f"Triton kernels need a CUDA device (this run is on {device_type}); TRITON_INTERPRET=1 runs them "
                "on CPU through Triton's interpreter, for testing")
    return None
