"""Core attention: causal scaled-dot-product attention with grouped key/value heads (GQA), and its
context-parallel form (keys and values all-gathered over cp, see parallel/context_parallel.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.distributed.comm import Comm
from scaletrain.nn.blockwise_attention import BlockwiseMask, blockwise_attention, prefix_attention
from scaletrain.parallel.mappings import gather_from_sequence


class CoreAttention(nn.Module):
    """softmax(q kᵀ / sqrt(d) + causal mask) v, with num_heads / num_kv_heads queries per key/value head.

    Placement: q [b, s, heads/tp, d], k and v [b, s, kv_heads/tp, d], all local to one tp rank
    (heads split over tp, whole GQA groups per rank); output [b, s, heads/tp·d].
    With a cp communicator bound (`bind_cp`, by parallelize) s is this cp rank's share of the
    sequence: k and v are all-gathered over cp (their gradients reduce-scattered back), put into
    sequence order, and attended to blockwise; the caller's mask is a `BlockwiseMask` saying where
    this rank's queries sit (parallel/context_parallel.py).
    """

    cp: Comm | None = None

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def bind_cp(self, comm: Comm) -> None:
        self.cp = comm if comm.size > 1 else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: torch.Tensor | BlockwiseMask | None = None) -> torch.Tensor:
        """attention_mask: optional boolean [b, 1, s, s_kv], True where attention is allowed (e.g.
        packing), or a BlockwiseMask (context parallelism)."""
        b, s = q.shape[:2]
        if isinstance(attention_mask, BlockwiseMask):
            if self.cp is not None:
                k, v = gather_from_sequence(k, self.cp), gather_from_sequence(v, self.cp)
            order = attention_mask.sequence_order
            k, v = k.index_select(1, order), v.index_select(1, order)
            if q.is_cuda and attention_mask.q_doc is None:  # SDPA's fused kernels take the lower-right mask
                return prefix_attention(q, k, v, attention_mask.segments)
            return blockwise_attention(q, k, v, attention_mask.segments, attention_mask.q_doc, attention_mask.k_doc)
        if self.cp is not None:
            raise ValueError("context-parallel attention needs a BlockwiseMask for this rank's queries "
                             "(parallel.context_parallel.shard_microbatch puts one in the batch)")
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = self.num_heads != self.num_kv_heads
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(b, s, -1)
