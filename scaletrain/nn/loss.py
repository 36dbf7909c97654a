"""Vocabulary-parallel cross-entropy: the full-vocabulary softmax is never materialised on one rank."""

from __future__ import annotations

import torch

from scaletrain.distributed.comm import Comm


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = log Σ_v exp(z_v) − z_label with z sharded over tp along v.

    Two collectives: an all-reduce(max) for stability, then one all-reduce of the stacked
    (sum of exp, label logit) pair. Backward is local: softmax − onehot.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, comm: Comm):
        vocab_local = logits.shape[-1]
        zmax = logits.max(dim=-1).values
        comm.all_reduce(zmax, op="max")
        shifted = logits - zmax.unsqueeze(-1)
        start = comm.rank * vocab_local
        outside = (labels < start) | (labels >= start + vocab_local)
        local = torch.where(outside, 0, labels - start)
        label_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sums = torch.stack([exp.sum(dim=-1), label_logit])
        comm.all_reduce(sums)
        sum_exp, label_logit = sums[0], sums[1]
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside)
        return sum_exp.log() - label_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local.unsqueeze(-1), -(~outside).to(g.dtype).unsqueeze(-1))
        return g * grad.unsqueeze(-1), None, None


def cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor, tp: Comm | None = None) -> torch.Tensor:
    """Per-token loss [b, s] from logits [b, s, V/tp] and labels [b, s], computed in at least float32.

    Placement: logits sharded over tp along V (the whole vocabulary when tp is None or of size 1);
    labels and the result replicated over tp.
    """
    compute = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.reshape(-1, logits.shape[-1]).to(compute)
    comm = tp if tp is not None else Comm.single("tp")
    return _VocabParallelCrossEntropy.apply(flat, labels.reshape(-1), comm).view(labels.shape)
