"""Context parallelism: the sequence of every sample split over the cp ranks of a replica.

Every block except attention is token-local, so a cp rank runs the model on its own tokens only;
attention needs every earlier token's keys and values. The layout is the load-balanced causal
split (the one Megatron-LM and Transformer Engine use): the sequence is cut into 2·cp chunks and
cp rank r holds chunks r and 2·cp−1−r, so under a causal mask every rank does the same amount of
attention work (rank 0 holds the cheapest and the most expensive chunk).

Attention all-gathers keys and values over cp (backward: reduce-scatter of their gradients) —
Llama 3's choice over ring attention: exact, simple, and with GQA the keys and values are small
next to the queries. The gathered keys are put back into sequence order and attended to blockwise
(nn/blockwise_attention.py), so no s/cp × s mask or score matrix is ever materialised; what the
attention needs to know — where this rank's queries sit, and the full row's document ids of packed
rows — is prepared here, before the split (`context_parallel_mask`).

Parameters are replicated over cp like over dp: each cp rank's gradients are partial sums over its
tokens, so they are reduced over the combined dp×cp group (`dims.comm("dp_cp")`), and the loss
normaliser counts the items of every cp rank. Sequence-level losses (DPO, reward models) first sum
their per-token parts over cp (`sum_over_cp`, whose backward sums the gradients back), then every cp
rank evaluates the same loss: counted cp times in the normaliser, the reported loss and the gradients
come out exact.

Rollouts (GRPO, PPO, on-policy distillation) decode token by token, where a sequence split buys
nothing: sampling and reward-model scoring run with cp unbound (`cp_unbound`), every cp rank a
whole-sequence sampler of its share of the replica's prompts (generation/sampler.py), and the
finished rows — replicated over cp again — are scored per token (reference, sampling-time log-probs,
the critic's values) in the cp layout and gathered back to whole rows (`gather_sequence`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from scaletrain.distributed.comm import Comm
from scaletrain.nn.attention import CoreAttention
from scaletrain.nn.blockwise_attention import BlockwiseMask, QuerySegment

# The per-token fields of the objectives' batches: split along dim 1.
SEQUENCE_FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids", "response_mask",
                   "ref_logps", "old_logps", "old_values", "returns")
# Split along dim 1 where they are per token ([b, s]): GRPO's advantages are per row [b], PPO's per token.
PER_TOKEN_WHEN_2D = ("advantages",)


def local_indices(seq_length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global sequence positions held by `cp_rank`: chunks cp_rank and 2·cp_size−1−cp_rank, in order."""
    if seq_length % (2 * cp_size):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2·cp = {2 * cp_size}")
    chunk = seq_length // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def gathered_order(seq_length: int, cp_size: int) -> torch.Tensor:
    """Global position of each entry of a sequence all-gathered over cp (rank 0's tokens, then rank 1's …)."""
    return torch.cat([local_indices(seq_length, cp_size, r) for r in range(cp_size)])


def attention_mask(seq_length: int, cp_size: int, cp_rank: int,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The dense boolean mask from this rank's queries to the gathered keys (rank order): causal in
    global positions, and within one document when `document_ids` [b, s] (full rows; −1 = padding)
    are given. Padding attends to itself only, as `posttrain.packing.block_causal_mask` does, so no
    row is empty. [1, 1, s/cp, s] or [b, 1, s/cp, s] — a reference for tests: training never builds
    it (see `context_parallel_mask`)."""
    q, k = local_indices(seq_length, cp_size, cp_rank), gathered_order(seq_length, cp_size)
    causal = k[None, :] <= q[:, None]
    if document_ids is None:
        return causal[None, None]
    q, k, causal = q.to(document_ids.device), k.to(document_ids.device), causal.to(document_ids.device)
    dq, dk = document_ids[:, q], document_ids[:, k]
    same = (dq[:, :, None] == dk[:, None, :]) & causal
    return (same | (k[None, :] == q[:, None]))[:, None]


def context_parallel_mask(seq_length: int, cp_size: int, cp_rank: int, document_ids: torch.Tensor | None,
                          device: torch.device) -> BlockwiseMask:
    """What attention under cp needs instead of a dense mask: this rank's two query chunks at their
    global positions, the permutation that puts keys all-gathered in rank order back into sequence
    order, and the document ids of packed rows (None: plain causal)."""
    chunk = seq_length // (2 * cp_size)
    segments = (QuerySegment(0, cp_rank * chunk, chunk),
                QuerySegment(chunk, (2 * cp_size - 1 - cp_rank) * chunk, chunk))
    order = torch.argsort(gathered_order(seq_length, cp_size)).to(device)
    q_doc = None
    if document_ids is not None:
        q_doc = document_ids[:, local_indices(seq_length, cp_size, cp_rank).to(document_ids.device)]
    return BlockwiseMask(segments, order, q_doc, document_ids)


def shard_microbatch(batch: dict[str, Any], cp: Comm) -> dict[str, Any]:
    """A full-length microbatch (every field replicated over cp) → this cp rank's part of it.

    Input: the sequence fields [b, s] (and any other field, left as is), identical on every cp
    rank. Output: the sequence fields [b, s/cp] at `local_indices`; `position_ids` (global positions
    when the batch has none — RoPE must see where a token really is); `attention_mask`, the
    `BlockwiseMask` of the model's attention, which gathers keys and values over cp.
    """
    if cp.size == 1:
        return batch
    tokens = batch["tokens"]
    s = tokens.shape[1]
    idx = local_indices(s, cp.size, cp.rank).to(tokens.device)
    out = dict(batch)
    if "position_ids" not in out:
        out["position_ids"] = torch.arange(s, device=tokens.device).expand_as(tokens)
    out["attention_mask"] = context_parallel_mask(s, cp.size, cp.rank, batch.get("document_ids"), tokens.device)
    if "score_index" in out:  # a reward model's read-out position, global → this rank's (−1: another rank's)
        where = out["score_index"]
        hit = idx[None, :] == where[:, None]
        out["score_index"] = torch.where(hit.any(-1), hit.float().argmax(-1), -1)
    for name in SEQUENCE_FIELDS + tuple(n for n in PER_TOKEN_WHEN_2D if n in out and out[n].dim() == 2):
        if name in out:
            if out[name].shape[1] != s:
                raise ValueError(f"context parallelism: batch field {name!r} has length {out[name].shape[1]}, "
                                 f"tokens have {s}")
            out[name] = out[name][:, idx].contiguous()
    return out


class _SumOverCP(torch.autograd.Function):
    """y = Σ over cp ranks of x, on every rank; backward: the same sum of the incoming gradients —
    every rank's y depends on every rank's x, and each rank's loss, which reads y, is a term of the
    total loss (the normaliser counts every cp rank's items)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm):
        ctx.comm = comm
        return comm.all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_reduce(grad.contiguous().clone()), None


def sum_over_cp(x: torch.Tensor, cp: Comm | None) -> torch.Tensor:
    """Per-sequence partial sums (each cp rank's tokens) → the whole sequence's sums, replicated over cp
    and differentiable: sequence-level losses (DPO log-probs, a reward model's score) under cp."""
    if cp is None or cp.size == 1:
        return x
    return _SumOverCP.apply(x, cp)


@torch.no_grad()
def gather_sequence(x: torch.Tensor, cp: Comm | None) -> torch.Tensor:
    """This cp rank's part of per-token values [b, s/cp, …] (at `local_indices`) → the whole rows
    [b, s, …] in sequence order, on every cp rank. Not differentiable: for values computed under
    no_grad (a reference's log-probs, a critic's values) that join the replicated batch."""
    if cp is None or cp.size == 1:
        return x
    s = x.shape[1] * cp.size
    gathered = cp.all_gather(x.contiguous(), dim=1)
    return gathered.index_select(1, torch.argsort(gathered_order(s, cp.size)).to(x.device))


@contextmanager
def cp_unbound(*models: torch.nn.Module) -> Iterator[None]:
    """Within the block the models' attention runs on whole sequences, unaware of cp (weights are
    replicated over cp, so every cp rank holds the whole model): for passes on rows that are not
    split — token-by-token sampling, a reward model's read-out. Restored on exit, errors included."""

    bound = [m for model in models for m in model.modules() if isinstance(m, CoreAttention) and m.cp is not None]
    saved = [m.cp for m in bound]
    for m in bound:
        m.cp = None
    try:
        yield
    finally:
        for m, comm in zip(bound, saved):
            m.cp = comm
