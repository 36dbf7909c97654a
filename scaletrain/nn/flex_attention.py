"""Masked attention as a fused kernel on CUDA: torch's flex_attention with a block mask built from the
described mask (nn/blockwise_attention.BlockwiseMask) — packed documents, with or without context
parallelism — instead of SDPA on a materialised s × s mask, which on CUDA means the math kernel under
grouped-query attention (the memory-efficient kernel does not take GQA) and an s × s score matrix.

The block mask says, per tile of 128 queries × 128 keys, whether the tile is empty, full or partial,
so whole tiles of other documents and of the future are skipped and only the diagonal / document
boundary tiles evaluate the mask per element. It is built per call from the document ids and query
positions (cheap next to the attention; nothing to keep in sync across layers or compiled graphs).

flex_attention must run compiled to be a fused kernel (eagerly it materialises the scores): the
CUDA path calls a `torch.compile`d flex_attention (inside a compiled block the call is traced
inline). On CPU, training keeps the blockwise path; flex runs there eagerly (forward only) to check
this path's numbers against it.
"""

from __future__ import annotations

import functools

import torch

from scaletrain.nn.blockwise_attention import BlockwiseMask


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockwiseMask,
                          compiled: bool | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v as flex_attention. q [b, s_q, heads, d] at the query positions `mask`
    gives; k, v [b, s_k, kv_heads, d] in sequence order. Same document (q_doc / k_doc, when packed) and
    not in the future; a token always sees itself (padding). Output [b, s_q, heads·d].
    compiled: default on CUDA (the fused kernel); False runs flex's eager reference (CPU tests)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = q.is_cuda if compiled is None else compiled
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    q_pos = mask.query_positions(q.device)
    q_doc, k_doc = mask.q_doc, mask.k_doc

    def allowed(batch, head, qi, ki):  # flex's mask_mod: index tensors in, bool out
        qp = q_pos[qi]
        ok = ki <= qp
        if q_doc is not None and k_doc is not None:
            ok = (ok & (q_doc[batch, qi] == k_doc[batch, ki])) | (ki == qp)
        return ok

    block_mask = create_block_mask(allowed, b if q_doc is not None else None, None, s_q, s_k, device=q.device,
                                   _compile=compiled)
    attend = _compiled_flex() if compiled else flex_attention
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                 enable_gqa=h != k.shape[2])
    return out.transpose(1, 2).reshape(b, s_q, h * d)  # type: ignore[union-attr]
