"""Token-level cross-entropy over (vocabulary-sharded) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss [b, s] from logits [b, s, V] and labels [b, s], computed in at least float32.

    Placement: logits sharded over tp along V (the whole vocabulary at tp = 1); labels and the
    result replicated.
    """
    compute = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.reshape(-1, logits.shape[-1]).to(compute)
    return F.cross_entropy(flat, labels.reshape(-1), reduction="none").view(labels.shape)
