"""Measured activation memory: bytes autograd keeps for backward, counted through saved-tensor hooks.

Works on any device (the CPU included, where no allocator statistics exist): every tensor autograd
saves during a forward passes through the pack hook; parameters and tensors already counted (views
of one storage) are skipped, so the total is the activation memory of that forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_activation_bytes(fn: Callable[[], Any], params: list[torch.Tensor],
                           held: Callable[[Any], list[torch.Tensor]] | None = None) -> tuple[Any, int]:
    """Run fn() (a forward that builds an autograd graph); return (its result, bytes saved for backward
    excluding `params`). Storages are counted once, whatever number of views is saved. `held` names
    tensors of the result that the caller keeps alive until backward (the schedule keeps the model's output:
    the logits), counted too where autograd did not save them already."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    param_ids = {id(p) for p in params}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t
        if id(t) in param_ids or id(base) in param_ids:
            return t  # a weight (or a view of one)
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in param_storages and key not in seen and storage.nbytes() > 0:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    for t in held(out) if held is not None else []:
        pack(t)
    return out, total

