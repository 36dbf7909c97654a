"""Vocabulary-parallel cross-entropy: the full-vocabulary softmax is never materialised on one rank."""

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


def cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor, tp: Comm | None = None,
                            fused: bool = False) -> torch.Tensor:
    """Per-token loss [b, s] from logits [b, s, V/tp] and labels [b, s], computed in at least float32.

    Placement: logits sharded over tp along V (the whole vocabulary when tp is None or of size 1);
    labels and the result replicated over tp. fused: the Triton kernels (parallel.kernels). Labels are
    token ids in [0, V) (positions not to be learnt are masked by the caller, not by a label value).

    Where the vocabulary is not split (tp None or of size 1) the unfused loss is torch's own
    `F.cross_entropy`: the same function, and about twice as fast forward + backward as the
    vocab-parallel autograd function, whose collectives and saved softmax buy nothing there.
    """
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
