"""Core attention: causal scaled-dot-product attention with grouped key/value heads (GQA), and its
context-parallel form (keys and values all-gathered over cp, see parallel/context_parallel.py).

Which kernel runs is decided per call by `attention_path` from the device and the mask: on CUDA every
masked case is a fused kernel (flash / memory-efficient SDPA, flex_attention); CPU keeps the paths
the parity tests were built on (SDPA, the blockwise online softmax)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.distributed.comm import Comm
from scaletrain.nn.blockwise_attention import BlockwiseMask, blockwise_attention, dense_mask, prefix_attention
from scaletrain.nn.flex_attention import flex_masked_attention
from scaletrain.parallel.mappings import gather_from_sequence

PATHS = ("sdpa_causal", "sdpa_mask", "sdpa_dense", "prefix", "flex", "blockwise")


def attention_path(device_type: str, mask: torch.Tensor | BlockwiseMask | None, cp_bound: bool) -> str:
    """The kernel that computes one attention call:

    - sdpa_causal: no mask (or whole unpacked rows) — SDPA is_causal, flash on CUDA.
    - sdpa_mask: a materialised boolean mask (KV-cache decoding, left-padded scoring rows) — SDPA with
      it; on CUDA grouped kv heads are expanded first, so SDPA can pick its memory-efficient kernel
      (which does not take enable_gqa) rather than the math one.
    - flex: packed documents on CUDA, whole rows or under cp — flex_attention with a block mask.
    - prefix: cp on CUDA, unpacked — fused SDPA per query chunk with a lower-right causal mask.
    - sdpa_dense: packed whole rows on CPU — the block-causal mask materialised, SDPA (exactly as before).
    - blockwise: cp on CPU, packed or not — the online-softmax blockwise path, nothing s × s.
    """
    if mask is None:
        return "sdpa_causal"
    if not isinstance(mask, BlockwiseMask):
        return "sdpa_mask"
    packed, whole = mask.q_doc is not None, mask.whole_rows and not cp_bound
    if whole and not packed:
        return "sdpa_causal"
    if device_type == "cuda":
        return "flex" if packed else "prefix"
    return "sdpa_dense" if whole else "blockwise"


class CoreAttention(nn.Module):
    """softmax(q kᵀ / sqrt(d) + causal mask) v, with num_heads / num_kv_heads queries per key/value head.

    Placement: q [b, s, heads/tp, d], k and v [b, s, kv_heads/tp, d], all local to one tp rank
    (heads split over tp, whole GQA groups per rank); output [b, s, heads/tp·d].
    With a cp communicator bound (`bind_cp`, by parallelize) s is this cp rank's share of the
    sequence: k and v are all-gathered over cp (their gradients reduce-scattered back) and put into
    sequence order; the caller's mask is a `BlockwiseMask` saying where this rank's queries sit
    (parallel/context_parallel.py). Packed rows come with a BlockwiseMask too (`document_mask`), so
    that CUDA runs them fused; `attention_path` picks the kernel.
    """

    cp: Comm | None = None

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def bind_cp(self, comm: Comm) -> None:
        self.cp = comm if comm.size > 1 else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: torch.Tensor | BlockwiseMask | None = None) -> torch.Tensor:
        """attention_mask: optional boolean [b, 1, s, s_kv], True where attention is allowed (KV-cache
        decoding, padded rows), or a BlockwiseMask (packed documents, context parallelism)."""
        b, s = q.shape[:2]
        path = attention_path(q.device.type, attention_mask, self.cp is not None)
        if isinstance(attention_mask, BlockwiseMask):
            if self.cp is not None:
                if attention_mask.whole_rows:
                    raise ValueError("context-parallel attention got a mask for whole rows; it needs this rank's "
                                     "(parallel.context_parallel.shard_microbatch puts one in the batch)")
                k, v = gather_from_sequence(k, self.cp), gather_from_sequence(v, self.cp)
            if attention_mask.sequence_order is not None:
                order = attention_mask.sequence_order
                k, v = k.index_select(1, order), v.index_select(1, order)
            if path == "prefix":
                return prefix_attention(q, k, v, attention_mask.segments)
            if path == "flex":
                return flex_masked_attention(q, k, v, attention_mask)
            if path == "blockwise":
                return blockwise_attention(q, k, v, attention_mask.segments, attention_mask.q_doc,
                                           attention_mask.k_doc)
            attention_mask = dense_mask(attention_mask, k.shape[1]) if path == "sdpa_dense" else None
        elif self.cp is not None:
            raise ValueError("context-parallel attention needs a BlockwiseMask for this rank's queries "
                             "(parallel.context_parallel.shard_microbatch puts one in the batch)")
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = self.num_heads != self.num_kv_heads
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            if gqa and q.is_cuda:  # the memory-efficient kernel takes a mask but not enable_gqa
                k, v = (t.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1) for t in (k, v))
                gqa = False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(b, s, -1)
