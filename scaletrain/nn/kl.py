"""Vocabulary-parallel KL divergence between a student's and a teacher's next-token distributions
(knowledge distillation), and the teacher's global top k over a sharded vocabulary.

Both distributions live as logits sharded over tp along the vocabulary, exactly as the model emits
them; the full-vocabulary softmax is never materialised on one rank. Each per-token divergence costs
the all-reduces of two vocab-parallel log-softmaxes (max, then sum of exp) and one of the local KL
sums; backward is local, because the gradient with respect to the student's logits has a closed form:

    forward KL(p_T ‖ p_S):  ∂/∂s = (p_S − p_T) / τ
    reverse KL(p_S ‖ p_T):  ∂/∂s = p_S · (log p_S − log p_T − KL) / τ
    top-k forward KL:       ∂/∂s = (p_S − q) / τ,  q = p_T on the teacher's top k and, off it, the
                            teacher's leftover mass in the proportions of the student's tail

(τ: the temperature both logits are divided by). Vocabulary rows at or beyond `vocab_limit` (the
padding a model's vocabulary is rounded up with) take no part: neither distribution puts mass there.
"""

from __future__ import annotations

import torch

from scaletrain.distributed.comm import Comm

KL_KINDS = ("forward_kl", "reverse_kl")


def _log_softmax(z: torch.Tensor, comm: Comm) -> torch.Tensor:
    """log-softmax over a vocabulary sharded along the last dim (padding columns are −inf)."""
    zmax = z.max(dim=-1).values
    zmax = comm.all_reduce(zmax, op="max")
    shifted = z - zmax.unsqueeze(-1)
    sum_exp = shifted.exp().sum(dim=-1)
    sum_exp = comm.all_reduce(sum_exp)
    return shifted - sum_exp.log().unsqueeze(-1)


def _padding(logits: torch.Tensor, comm: Comm, vocab_limit: int | None) -> torch.Tensor:
    """[V/tp] bool: this shard's columns whose global id is ≥ vocab_limit."""
    v = logits.shape[-1]
    ids = torch.arange(comm.rank * v, (comm.rank + 1) * v, device=logits.device)
    return ids >= (vocab_limit if vocab_limit is not None else v * comm.size)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor | None, top_ids: torch.Tensor | None,
                top_logps: torch.Tensor | None, comm: Comm, tau: float, reverse: bool, vocab_limit: int | None):
        compute = torch.promote_types(student.dtype, torch.float32)
        pad = _padding(student, comm, vocab_limit)
        logp_s = _log_softmax((student.to(compute) / tau).masked_fill(pad, float("-inf")), comm)
        p_s = logp_s.exp()
        if teacher is not None:
            logp_t = _log_softmax((teacher.to(compute) / tau).masked_fill(pad, float("-inf")), comm)
            if reverse:
                diff = torch.where(pad, 0.0, logp_s - logp_t)
                kl = comm.all_reduce((p_s * diff).sum(dim=-1))
                grad = p_s * (diff - kl.unsqueeze(-1))
            else:
                p_t = logp_t.exp()
                kl = comm.all_reduce(torch.where(pad, 0.0, p_t * (logp_t - logp_s)).sum(dim=-1))
                grad = p_s - p_t
        else:  # sparse: the teacher's top k, the rest of its mass as one more outcome
            assert top_ids is not None and top_logps is not None
            log_p = top_logps.to(compute)  # log p_T at τ of the top k (normalised over the whole vocabulary)
            p = log_p.exp()
            rest_t = (1.0 - p.sum(dim=-1)).clamp_min(0.0)
            v = student.shape[-1]
            local = top_ids - comm.rank * v
            inside = (local >= 0) & (local < v)
            local = torch.where(inside, local, 0)
            logp_s_top = comm.all_reduce(logp_s.gather(-1, local).masked_fill(~inside, 0.0))
            s_top = logp_s_top.exp()
            rest_s = (1.0 - s_top.sum(dim=-1)).clamp_min(torch.finfo(compute).tiny)
            kl = (torch.where(p > 0, p * (log_p - logp_s_top), 0.0).sum(dim=-1)
                  + torch.where(rest_t > 0, rest_t * (rest_t.log() - rest_s.log()), 0.0))
            # ∂/∂s = p_S − q: q = p_T on the top k; off it, the teacher's leftover mass spread in the
            # proportions of the student's own tail (which the coarse KL cannot see).
            share = (rest_t / rest_s).unsqueeze(-1)
            grad = p_s * (1.0 - share)
            grad = grad.scatter_add(-1, local, (s_top * share - p) * inside)
        ctx.save_for_backward(grad.div_(tau))
        ctx.student_dtype = student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        return (grad * grad_kl.unsqueeze(-1)).to(ctx.student_dtype), None, None, None, None, None, None, None


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, tp: Comm | None = None, *,
                 kind: str = "forward_kl", temperature: float = 1.0, top_ids: torch.Tensor | None = None,
                 top_logps: torch.Tensor | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """Per-token KL [b, s] between softmax(teacher/τ) and softmax(student/τ), in at least float32.

    Placement: student and (dense) teacher logits [b, s, V/tp] sharded over tp along V (the whole
    vocabulary when tp is None or of size 1); top_ids / top_logps [b, s, k] (global vocabulary ids of
    the teacher's top k and their log-probabilities at τ, from `teacher_top_k`) and the result
    replicated over tp. Gradients flow to the student's logits only. kind: 'forward_kl' (KL(p_T ‖ p_S),
    mass-covering; the only one the sparse form supports) or 'reverse_kl' (KL(p_S ‖ p_T), mode-seeking).

    Sparse form: the KL between the two distributions coarsened to k + 1 outcomes — each of the
    teacher's top k, and "any other token" (the teacher's leftover mass against the student's). It
    never exceeds the full KL, equals it when k covers the vocabulary, and, unlike renormalising the
    top k, does not teach the student that every other token is impossible."""
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; choose from {', '.join(KL_KINDS)}")
    if (teacher_logits is None) == (top_ids is None):
        raise ValueError("give either the teacher's dense logits or its top-k ids and log-probs")
    if top_ids is not None and kind != "forward_kl":
        raise ValueError("the sparse top-k teacher supports forward KL only: reverse KL needs p_T everywhere")
    comm = tp if tp is not None else Comm.single("tp")
    return _VocabParallelKL.apply(student_logits, teacher_logits, top_ids, top_logps, comm, float(temperature),
                                  kind == "reverse_kl", vocab_limit)


@torch.no_grad()
def teacher_top_k(logits: torch.Tensor, k: int, tp: Comm | None = None, *, temperature: float = 1.0,
                  vocab_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely tokens over the whole (sharded) vocabulary: (ids [b, s, k] int64
    global, log-probabilities at τ [b, s, k] in at least float32), replicated over tp. Each rank's local top k is
    all-gathered (tp·k candidates per token), then reduced to k: the global top k is among them."""
    comm = tp if tp is not None else Comm.single("tp")
    compute = torch.promote_types(logits.dtype, torch.float32)
    logp = _log_softmax((logits.to(compute) / temperature).masked_fill(_padding(logits, comm, vocab_limit),
                                                                       float("-inf")), comm)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    ids = ids + comm.rank * logits.shape[-1]
    if comm.size > 1:
        values, ids = comm.all_gather(values, dim=-1), comm.all_gather(ids, dim=-1)
        values, pick = values.topk(k, dim=-1)
        ids = ids.gather(-1, pick)
    return ids, values
