"""Per-rank memory accounting: parameters, gradients, optimizer state, activations."""

from __future__ import annotations

import torch


def _nbytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:  # views into one bucket buffer count once
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def memory_report(model: torch.nn.Module, optimizer, device: torch.device) -> dict[str, int]:
    """Bytes this rank holds: parameters, gradients (the dp bucket buffers when they exist),
    optimizer state (AdamW moments; with ZeRO-1 also the fp32 main shards), and — on CUDA — the
    peak allocation beyond those (activations and temporaries)."""
    params = list(model.parameters())
    buckets = getattr(model, "grad_buckets", None)
    grads = [b.buffer for b in buckets.buckets] if buckets is not None else [p.grad for p in params]
    inner = getattr(optimizer, "inner", optimizer)
    state = [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
    mains = [s.main for s in getattr(optimizer, "segments", [])]
    report = {"params": _nbytes(params), "grads": _nbytes(grads), "optimizer": _nbytes(state + mains)}
    if device.type == "cuda":
        static = sum(report.values())
        report["activations_peak"] = max(torch.cuda.max_memory_allocated(device) - static, 0)
    return report


def format_report(report: dict[str, int]) -> str:
    return "memory per rank: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in report.items())
