"""Core attention: causal scaled-dot-product attention with grouped key/value heads (GQA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CoreAttention(nn.Module):
    """softmax(q kᵀ / sqrt(d) + causal mask) v, with num_heads / num_kv_heads queries per key/value head.

    Placement: q [b, s, heads/tp, d], k and v [b, s, kv_heads/tp, d], all local to one tp rank
    (heads split over tp, whole GQA groups per rank); output [b, s, heads/tp·d].
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attention_mask: optional boolean [b, 1, s, s], True where attention is allowed (e.g. packing)."""
        b, s = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = self.num_heads != self.num_kv_heads
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(b, s, -1)
