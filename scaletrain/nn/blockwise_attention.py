"""Blockwise (flash-style) causal attention in plain torch, for context parallelism.

Under cp a rank's queries are two chunks of the sequence and its keys are the whole sequence, so
the mask is neither top-left causal nor small: materialised, it is s/cp × s per row of the batch,
and SDPA turns it into a float bias it keeps for backward in every layer — at long context that
is more memory than cp saves. Here nothing s×s ever exists: queries and keys are walked in
blocks with an online softmax (running max and sum), blocks above the diagonal are skipped
(decided on the host from positions, no device sync), blocks below it need no mask, and only the
diagonal blocks (and packed documents) build a small block mask. Backward recomputes each block's
probabilities from the saved log-sum-exp (FlashAttention's recurrence), so what is kept for
backward is q, k, v, the output and one float per query and head.

Grouped-query attention never expands k and v: the q heads of one kv head are folded into the
query dimension ([b, kv, g·s_q, d]).

Numerics: scores, softmax statistics and accumulators are float32 (float64 inputs stay float64);
the result equals SDPA's to rounding.

On CUDA this path is not taken (nn/attention.py chooses): unpacked rows take `prefix_attention`, each
query chunk attending to the key prefix up to its end with PyTorch's lower-right causal bias, which
SDPA runs in its fused flash / memory-efficient kernels without a mask (on CPU the same call
materialises the mask, so CPU uses the blockwise path); packed rows take flex_attention with a block
mask built from the same description (nn/flex_attention.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Queries (and keys) per block: the transient score block is [b, heads, BLOCK, BLOCK]. 256 measured
# fastest on CPU (benchmarks/bench_cp.py: 128-512 within 15%, 1024 2.5x slower, 4096 4x).
BLOCK = 256


@dataclass(frozen=True)
class QuerySegment:
    """A run of local queries at consecutive global positions: rows [offset, offset+length) of q
    hold positions [start, start+length) of the sequence."""

    offset: int
    start: int
    length: int


@dataclass(frozen=True)
class BlockwiseMask:
    """The mask of one attention call, described instead of materialised (carried in a batch as
    `attention_mask`; built by parallel/context_parallel.py, or `document_mask` for packed rows):
    where the queries sit, how to put the keys into sequence order, and packed rows' document ids.
    Tensors on the batch's device. nn/attention.py picks the kernel that computes it."""

    segments: tuple[QuerySegment, ...]
    sequence_order: torch.Tensor | None  # [s]: index into the given keys of each sequence position (None: in order)
    q_doc: torch.Tensor | None  # [b, s_q] document ids (−1 padding), or None: plain causal
    k_doc: torch.Tensor | None  # [b, s], sequence order
    # Derived per microbatch and shared by its layers (the te backend's cu_seqlens); not compared.
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def whole_rows(self) -> bool:
        """Queries are the rows' every position, in order, and keys are in order: no context parallelism."""
        return (self.sequence_order is None and len(self.segments) == 1
                and self.segments[0].offset == 0 and self.segments[0].start == 0)

    def query_positions(self, device: torch.device) -> torch.Tensor:
        """[s_q] the sequence position of each local query row."""
        pos = torch.empty(sum(seg.length for seg in self.segments), dtype=torch.long)
        for seg in self.segments:
            pos[seg.offset:seg.offset + seg.length] = torch.arange(seg.start, seg.start + seg.length)
        return pos.to(device)


def document_mask(document_ids: torch.Tensor) -> BlockwiseMask:
    """Packed rows [b, s] (document ids, −1 padding) without context parallelism: the block-diagonal
    causal mask of `posttrain.packing.block_causal_mask`, described instead of materialised, so that
    attention can run it as a fused kernel (flex_attention, or TE's cu_seqlens) on CUDA."""
    s = document_ids.shape[1]
    return BlockwiseMask((QuerySegment(0, 0, s),), None, document_ids, document_ids)


def dense_mask(mask: BlockwiseMask, s_k: int) -> torch.Tensor:
    """The materialised boolean mask [b|1, 1, s_q, s_k] (True = may attend) of a described one: same
    document (when packed) and not in the future; a token always sees itself (padding)."""
    q_pos = mask.query_positions(mask.q_doc.device if mask.q_doc is not None else torch.device("cpu"))
    k_pos = torch.arange(s_k, device=q_pos.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None]  # [1, s_q, s_k]
    if mask.q_doc is not None and mask.k_doc is not None:
        same = mask.q_doc[:, :, None] == mask.k_doc[:, None, :]
        allowed = (same & allowed) | (k_pos[None, :] == q_pos[:, None])[None]
    return allowed[:, None]


def document_cu_seqlens(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Packed rows [b, s] → (cu_seqlens int32 [n + 1], longest run) of the flattened b·s tokens, one
    sequence per run of equal ids within a row (what a `thd` varlen kernel takes). A padding run is one
    causal sequence of its own: its tokens see each other, which changes only padding outputs (no real
    token attends to padding, and padding carries no loss). One host sync (the longest run)."""
    b, s = document_ids.shape
    flat = document_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # every row starts a sequence
    idx = torch.nonzero(starts).reshape(-1)
    cu = torch.cat([idx, idx.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def _blocks(segments: tuple[QuerySegment, ...], block: int):
    for seg in segments:
        for i in range(0, seg.length, block):
            n = min(block, seg.length - i)
            yield seg.offset + i, seg.start + i, n


def _block_mask(q_pos0: int, nq: int, k0: int, nk: int, q_doc: torch.Tensor | None, k_doc: torch.Tensor | None,
                device: torch.device) -> torch.Tensor | None:
    """[b|1, 1, 1, nq, nk] True = may attend, or None when the whole block may (below the diagonal,
    no documents). Same document and not in the future; a token always sees itself (padding)."""
    below = k0 + nk - 1 <= q_pos0
    if below and q_doc is None:
        return None
    qp = torch.arange(q_pos0, q_pos0 + nq, device=device)
    kp = torch.arange(k0, k0 + nk, device=device)
    causal = kp[None, :] <= qp[:, None]
    if q_doc is None or k_doc is None:
        return causal[None, None, None]
    same = (q_doc[:, :, None] == k_doc[:, None, :]) & causal
    return (same | (kp[None, :] == qp[:, None]))[:, None, None]


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segments, q_doc, k_doc, block):  # type: ignore[override]
        # q [b, kv, g, sq, d]; k, v [b, kv, sk, d] in sequence order
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale = 1.0 / math.sqrt(q.shape[-1])
        b, kv, g, sq, d = q.shape
        out = torch.zeros(b, kv, g, sq, d, dtype=acc, device=q.device)
        lse = torch.full((b, kv, g, sq), -math.inf, dtype=acc, device=q.device)
        for row0, pos0, nq in _blocks(segments, block):
            qb = q[:, :, :, row0:row0 + nq].to(acc) * scale
            qd = q_doc[:, row0:row0 + nq] if q_doc is not None else None
            m = torch.full((b, kv, g, nq), -math.inf, dtype=acc, device=q.device)
            s = torch.zeros((b, kv, g, nq), dtype=acc, device=q.device)
            o = torch.zeros((b, kv, g, nq, d), dtype=acc, device=q.device)
            for k0 in range(0, pos0 + nq, block):  # keys after the block's last query are never seen
                nk = min(block, pos0 + nq - k0)
                kb, vb = k[:, :, None, k0:k0 + nk].to(acc), v[:, :, None, k0:k0 + nk].to(acc)
                scores = qb @ kb.transpose(-1, -2)  # [b, kv, g, nq, nk]
                mask = _block_mask(pos0, nq, k0, nk, qd, k_doc[:, k0:k0 + nk] if k_doc is not None else None,
                                   q.device)
                if mask is not None:
                    scores = scores.masked_fill(~mask, -math.inf)
                m_new = torch.maximum(m, scores.amax(-1))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing yet
                p = torch.exp(scores - m_safe[..., None])
                correction = torch.exp(m - m_safe)
                s = s * correction + p.sum(-1)
                o = o * correction[..., None] + p @ vb
                m = m_new
            out[:, :, :, row0:row0 + nq] = o / s[..., None]
            lse[:, :, :, row0:row0 + nq] = m + torch.log(s)
        # A fresh tensor even when the dtype is already right: returned as is, a buffer filled by slice writes
        # gets no gradient under torch.compile on torch 2.11 (dq, dk, dv all zero; fixed in 2.13).
        out = out.to(q.dtype, copy=True)
        ctx.save_for_backward(q, k, v, out, lse, *(t for t in (q_doc, k_doc) if t is not None))
        ctx.segments, ctx.block, ctx.has_doc, ctx.scale = segments, block, q_doc is not None, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse, *docs = ctx.saved_tensors
        q_doc, k_doc = (docs[0], docs[1]) if ctx.has_doc else (None, None)
        acc, scale, block = lse.dtype, ctx.scale, ctx.block
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        # D_i = rowsum(dO_i · O_i): the softmax Jacobian's correction term per query.
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
        for row0, pos0, nq in _blocks(ctx.segments, block):
            rows = slice(row0, row0 + nq)
            qb, do = q[:, :, :, rows].to(acc), grad_out[:, :, :, rows].to(acc)
            lb, db = lse[:, :, :, rows], delta[:, :, :, rows]
            qd = q_doc[:, rows] if q_doc is not None else None
            for k0 in range(0, pos0 + nq, block):
                nk = min(block, pos0 + nq - k0)
                keys = slice(k0, k0 + nk)
                kb, vb = k[:, :, None, keys].to(acc), v[:, :, None, keys].to(acc)
                scores = (qb * scale) @ kb.transpose(-1, -2)
                mask = _block_mask(pos0, nq, k0, nk, qd, k_doc[:, keys] if k_doc is not None else None, q.device)
                p = torch.exp(scores - lb[..., None])
                if mask is not None:
                    p = p.masked_fill(~mask, 0.0)
                dv[:, :, keys] += (p.transpose(-1, -2) @ do).sum(2)  # summed over the q heads of a kv head
                dp = do @ vb.transpose(-1, -2)
                ds = p * (dp - db[..., None]) * scale
                dq[:, :, :, rows] += ds @ kb
                dk[:, :, keys] += (ds.transpose(-1, -2) @ qb).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     segments: tuple[QuerySegment, ...]) -> torch.Tensor:
    """Plain causal attention of query segments to the keys before them, one fused SDPA call per
    segment: queries at [start, start+n) see keys [0, start+n) under a lower-right-aligned causal
    mask. Shapes as `blockwise_attention` (no documents)."""
    from torch.nn.attention.bias import causal_lower_right

    b, sq, h, d = q.shape
    gqa = h != k.shape[2]
    out = []
    for seg in segments:
        end = seg.start + seg.length
        qs = q[:, seg.offset:seg.offset + seg.length].transpose(1, 2)
        ks, vs = k[:, :end].transpose(1, 2), v[:, :end].transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=causal_lower_right(seg.length, end), enable_gqa=gqa)
        out.append(o.transpose(1, 2).reshape(b, seg.length, h * d))
    return torch.cat(out, dim=1)


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: tuple[QuerySegment, ...],
                        q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
                        block: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d + mask) v without an s×s tensor. q [b, sq, heads, d] at the global positions
    `segments` give; k, v [b, sk, kv_heads, d] at positions 0..sk−1 (sequence order). q_doc [b, sq],
    k_doc [b, sk]: document ids (−1 padding) for packed rows, or None (plain causal). block: queries
    and keys per block (default BLOCK, read at call time). Output [b, sq, heads·d]."""
    b, sq, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qg = q.view(b, sq, kv, g, d).permute(0, 2, 3, 1, 4)  # [b, kv, g, sq, d]: a kv head's q heads together
    out = _BlockwiseAttention.apply(qg, k.transpose(1, 2), v.transpose(1, 2), segments, q_doc, k_doc, block or BLOCK)
    return out.permute(0, 3, 1, 2, 4).reshape(b, sq, h * d)
