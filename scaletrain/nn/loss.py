"""Vocabulary-parallel cross-entropy: the full-vocabulary softmax is never materialised on one rank.

Low-precision (bf16) logits go through `_ChunkedCrossEntropy`: the float32 working copy exists for one
chunk of rows (tokens) at a time, forward and backward, so the loss never holds float32 logits — or
their softmax — for the whole sequence; what it keeps for backward is the bf16 logits themselves plus a
float32 log-sum-exp per token. float32 / float64 logits keep the paths below (torch's F.cross_entropy at
tp = 1, as before).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaletrain.distributed.comm import Comm


class VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = log Σ_v exp(z_v) − z_label with z sharded over tp along v.

    Two collectives: an all-reduce(max) for stability, then one all-reduce of the stacked
    (sum of exp, label logit) pair. Backward is local: softmax − onehot.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, comm: Comm):
        vocab_local = logits.shape[-1]
        zmax = logits.max(dim=-1).values
        zmax = comm.all_reduce(zmax, op="max")
        shifted = logits - zmax.unsqueeze(-1)
        start = comm.rank * vocab_local
        outside = (labels < start) | (labels >= start + vocab_local)
        local = torch.where(outside, 0, labels - start)
        label_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sums = torch.stack([exp.sum(dim=-1), label_logit])
        sums = comm.all_reduce(sums)
        sum_exp, label_logit = sums[0], sums[1]
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside)
        return sum_exp.log() - label_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local.unsqueeze(-1), -(~outside).to(g.dtype).unsqueeze(-1))
        return g * grad.unsqueeze(-1), None, None


class _FusedVocabParallelCrossEntropy(torch.autograd.Function):
    """The same loss with the row statistics and the gradient in Triton (scaletrain_kernels): the
    logits are read in their own dtype and kept for backward instead of an fp32 softmax."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, comm: Comm):
        from scaletrain_kernels.cross_entropy import ce_stats

        start = comm.rank * logits.shape[-1]
        outside = (labels < start) | (labels >= start + logits.shape[-1])
        local = torch.where(outside, -1, labels - start)
        local_max, local_sum, label_logit = ce_stats(logits, local)
        global_max = comm.all_reduce(local_max.clone(), op="max")
        sums = torch.stack([local_sum * torch.exp(local_max - global_max), label_logit])
        sums = comm.all_reduce(sums)
        ctx.save_for_backward(logits, local, global_max, sums[0])
        return torch.log(sums[0]) + global_max - sums[1]

    @staticmethod
    def backward(ctx, grad):
        from scaletrain_kernels.cross_entropy import ce_grad

        logits, local, global_max, global_sum = ctx.saved_tensors
        return ce_grad(logits, local, global_max, global_sum, grad), None, None


CHUNK_BYTES = 2**28  # float32 working set of one chunk of the chunked loss (rows × vocab/tp × 4 bytes)


def chunk_rows(vocab_local: int) -> int:
    """Rows (tokens) per chunk of the chunked loss for a vocabulary slice of `vocab_local` entries."""
    return max(1, CHUNK_BYTES // (4 * vocab_local))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """loss = logsumexp_v(z_v) − z_label over z sharded over tp along v, in float32 chunk by chunk.

    Forward: per chunk of rows the local log-sum-exp (one fused pass over a float32 copy of the chunk) and the
    label's logit; then over tp one all-reduce of the maxima of the local log-sum-exps and one of the
    stacked (Σ exp(lse_r − max), label logit) — the global log-sum-exp. Saved: the logits (their own dtype,
    no copy), the label positions and the float32 log-sum-exp. Backward: per chunk softmax − onehot,
    computed in place on the chunk's float32 copy and written into a gradient of the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, comm: Comm, rows: int):
        n, vocab_local = logits.shape
        start = comm.rank * vocab_local
        outside = (labels < start) | (labels >= start + vocab_local)
        local = torch.where(outside, 0, labels - start)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        label_logit = torch.empty(n, dtype=torch.float32, device=logits.device)
        for lo in range(0, n, rows):
            z = logits[lo:lo + rows].float()
            lse[lo:lo + rows] = torch.logsumexp(z, dim=-1)
            label_logit[lo:lo + rows] = z.gather(-1, local[lo:lo + rows].unsqueeze(-1)).squeeze(-1)
        label_logit.masked_fill_(outside, 0.0)
        if comm.size > 1:  # combine the ranks' log-sum-exps: max, then Σ exp(lse_r − max) beside the label logit
            zmax = comm.all_reduce(lse.clone(), op="max")
            sums = comm.all_reduce(torch.stack([(lse - zmax).exp_(), label_logit]))
            lse, label_logit = sums[0].log_() + zmax, sums[1]
        ctx.save_for_backward(logits, local, outside, lse)
        ctx.rows = rows
        return lse - label_logit

    @staticmethod
    def backward(ctx, grad):
        logits, local, outside, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        inside = (~outside).to(torch.float32).unsqueeze(-1)
        for lo in range(0, logits.shape[0], ctx.rows):
            hi = lo + ctx.rows
            p = logits[lo:hi].float().sub_(lse[lo:hi].unsqueeze(-1)).exp_()
            p.scatter_add_(-1, local[lo:hi].unsqueeze(-1), -inside[lo:hi])
            torch.mul(p, grad[lo:hi].unsqueeze(-1), out=p)
            out[lo:hi] = p
        return out, None, None, None


def cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor, tp: Comm | None = None,
                            fused: bool = False) -> torch.Tensor:
    """Per-token loss [b, s] from logits [b, s, V/tp] and labels [b, s], computed in at least float32.

    Placement: logits sharded over tp along V (the whole vocabulary when tp is None or of size 1);
    labels and the result replicated over tp. fused: the Triton kernels (parallel.kernels). Labels are
    token ids in [0, V) (positions not to be learnt are masked by the caller, not by a label value).

    Where the vocabulary is not split (tp None or of size 1) the unfused loss is torch's own
    `F.cross_entropy`: the same function, and about twice as fast forward + backward as the
    vocab-parallel autograd function, whose collectives and saved softmax buy nothing there.
    Logits in a lower precision than float32 (bf16 runs) take the chunked loss at any tp: float32
    exists one chunk of tokens at a time (`chunk_rows`), never for the whole sequence.
    """
    if not fused and logits.dtype not in (torch.float32, torch.float64):
        flat = logits.reshape(-1, logits.shape[-1])
        comm = tp if tp is not None else Comm.single("tp")
        return _ChunkedCrossEntropy.apply(flat, labels.reshape(-1), comm, chunk_rows(flat.shape[-1])).view(labels.shape)
    if not fused and (tp is None or tp.size == 1):
        compute = torch.promote_types(logits.dtype, torch.float32)
        flat = logits.reshape(-1, logits.shape[-1]).to(compute)
        return F.cross_entropy(flat, labels.reshape(-1), reduction="none").view(labels.shape)
    if fused:
        flat = logits.reshape(-1, logits.shape[-1])
        comm = tp if tp is not None else Comm.single("tp")
        return _FusedVocabParallelCrossEntropy.apply(flat, labels.reshape(-1), comm).view(labels.shape)
    compute = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.reshape(-1, logits.shape[-1]).to(compute)
    comm = tp if tp is not None else Comm.single("tp")
    return VocabParallelCrossEntropy.apply(flat, labels.reshape(-1), comm).view(labels.shape)
