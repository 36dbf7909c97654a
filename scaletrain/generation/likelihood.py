"""Log-likelihoods of continuations under a (frozen) model in any parallel layout.

`continuation_logprobs` is the one primitive evaluation needs besides generation: for rows
(token ids, start) it returns Σ log p(ids[start:] | ids[:start]) per row and the number of scored
tokens, through the layout's forward-only schedule and the vocab-parallel cross-entropy (the
vocabulary is never gathered). Rows are right-padded per microbatch (padding is its own document,
so it changes no score); the values are exact on the last pipeline stage and broadcast over pp, so
every rank of the replica returns them. Under data parallelism each replica scores its contiguous
share of the rows and the shares are summed over dp: every rank returns every row's score. Under
context parallelism the cp ranks score rows whole (cp unbound: evaluation rows are short next to a
long-context run's training rows), each a share like extra dp replicas, summed over dp × cp. Under
pipeline parallelism every microbatch of a pass has the pass's longest row's width (the stages agree
on one activation shape); otherwise each is as wide as its own longest row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scaletrain.distributed.dims import ParallelDims
from scaletrain.generation.batching import contiguous_share
from scaletrain.nn import cross_entropy_per_token
from scaletrain.nn.blockwise_attention import document_mask
from scaletrain.parallel.context_parallel import cp_unbound
from scaletrain.parallel.parallelize import eager
from scaletrain.trainer.step import forward_pass


def _microbatch(rows: Sequence[tuple[list[int], int]], index: list[int], pad_id: int, width: int) -> dict:
    n = len(rows)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    documents = torch.full((n, width), -1, dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        length = len(ids) - 1
        tokens[r, :length] = torch.tensor(ids[:-1])
        labels[r, :length] = torch.tensor(ids[1:])
        mask[r, start - 1:length] = 1  # position i predicts ids[i + 1]
        documents[r, :length] = 0
    positions = torch.arange(width).expand(n, width).clone()
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": positions,
            "document_ids": documents, "index": torch.tensor(index)}


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, dims: ParallelDims, rows: Sequence[tuple[list[int], int]], *, micro_batch: int,
                          precision, device: torch.device, pad_id: int,
                          width_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] float64 Σ log p of each row's continuation, [n] int64 its token count), on every rank.

    rows: (ids, start) with 1 ≤ start < len(ids): ids[start:] is scored given ids[:start]. Collective
    over the whole world (tp and pp within a replica, then dp × cp). width_multiple: rows padded to a
    multiple of it (tp under sequence parallelism)."""
    for ids, start in rows:
        if not 1 <= start < len(ids):
            raise ValueError(f"a row of {len(ids)} tokens cannot score from position {start}")
    tp = dims.tp_comm

    def read(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logp = -cross_entropy_per_token(output, batch["labels"], tp)
        m = batch["loss_mask"].to(logp.dtype)
        return torch.stack([(logp * m).sum(-1), m.sum(-1)], dim=-1)

    sums = _replica_pass(model, dims, rows, read, 2, micro_batch=micro_batch, precision=precision, device=device,
                         pad_id=pad_id, width_multiple=width_multiple)
    return sums[:, 0], sums[:, 1].long()


@torch.no_grad()
def continuation_token_logprobs(model: torch.nn.Module, dims: ParallelDims, rows: Sequence[tuple[list[int], int]], *,
                                micro_batch: int, precision, device: torch.device, pad_id: int,
                                width_multiple: int = 1) -> list[torch.Tensor]:
    """Per row, [len(ids) − start] float64: log p of each continuation token (what `continuation_logprobs`
    sums), on every rank; collective like it. For per-document sums of windows that span documents."""
    for ids, start in rows:
        if not 1 <= start < len(ids):
            raise ValueError(f"a row of {len(ids)} tokens cannot score from position {start}")
    tp = dims.tp_comm
    width = max(len(ids) - 1 for ids, _ in rows)

    def read(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logp = -cross_entropy_per_token(output, batch["labels"], tp) * batch["loss_mask"]
        logp = logp[:, :width]  # (rows padded for sequence parallelism are wider; the rest is masked)
        return torch.nn.functional.pad(logp, (0, width - logp.shape[-1]))

    values = _replica_pass(model, dims, rows, read, width, micro_batch=micro_batch, precision=precision,
                           device=device, pad_id=pad_id, width_multiple=width_multiple)
    return [values[r, start - 1:len(ids) - 1] for r, (ids, start) in enumerate(rows)]


@torch.no_grad()
def scores_at(model: torch.nn.Module, dims: ParallelDims, rows: Sequence[tuple[list[int], int]], *, micro_batch: int, precision,
              device: torch.device, pad_id: int, width_multiple: int = 1) -> torch.Tensor:
    """[n] float64: a score-head model's output (reward models: model.num_labels = 1) at position `at` of
    each (ids, at) row, on every rank; collective like `continuation_logprobs`."""
    for ids, at in rows:
        if not 0 <= at < len(ids):
            raise ValueError(f"a row of {len(ids)} tokens has no position {at}")

    def read(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        at = batch["at"]
        return output[torch.arange(output.shape[0], device=output.device), at, 0][:, None]

    # (ids + one pad token, 1): the microbatch builder's input rows are ids[:-1], so every id is an input.
    padded = [(list(ids) + [pad_id], 1) for ids, _ in rows]
    return _replica_pass(model, dims, padded, read, 1, micro_batch=micro_batch, precision=precision, device=device,
                         pad_id=pad_id, width_multiple=width_multiple, extra={"at": [at for _, at in rows]})[:, 0]


def _replica_pass(model: torch.nn.Module, dims: ParallelDims, rows: Sequence[tuple[list[int], int]], read, fields: int, *,
                  micro_batch: int, precision, device: torch.device, pad_id: int, width_multiple: int,
                  extra: dict[str, list[int]] | None = None) -> torch.Tensor:
    """`read(output, batch)` → [rows of the microbatch, fields] per microbatch through the layout's
    forward-only schedule, each dp replica (and each cp rank of one: rows run whole) on its contiguous
    share; the [n, fields] float64 result on every rank."""
    workers, me = dims.dp * dims.cp, dims.dp_rank * dims.cp + dims.cp_rank
    mine = list(contiguous_share(len(rows), workers, me))
    values: dict[int, torch.Tensor] = {}
    if mine:  # (a replica with no rows skips its passes; its ranks agree on that)
        unit = micro_batch * (dims.pp if dims.vpp > 1 else 1)
        padded = mine + [mine[-1]] * (-len(mine) % unit)  # whole (interleaved: whole groups of) microbatches
        chunks = [padded[s:s + micro_batch] for s in range(0, len(padded), micro_batch)]
        widths = [max(len(rows[i][0]) - 1 for i in chunk) for chunk in chunks]
        if dims.pp > 1:  # stages exchange activations of one agreed shape per pass
            widths = [max(widths)] * len(widths)
        mbs = []
        for chunk, w in zip(chunks, widths):
            mb = _microbatch([rows[i] for i in chunk], chunk, pad_id, w + -w % width_multiple)
            for key, column in (extra or {}).items():
                mb[key] = torch.tensor([column[i] for i in chunk])
            mbs.append({k: v.to(device) for k, v in mb.items()})

        def forward_step(batch: dict[str, torch.Tensor], module: torch.nn.Module):
            out = module(batch["tokens"], position_ids=batch["position_ids"],
                         attention_mask=document_mask(batch["document_ids"]))

            def record(output: torch.Tensor):
                for i, v in zip(batch["index"].tolist(), read(output, batch).double().cpu()):
                    values[i] = v  # repeats (padding to whole microbatches) only overwrite
                return output.new_zeros(()), {}

            return out, record

        was_training = model.training
        model.eval()
        with cp_unbound(model), eager(), precision.autocast():  # rows of any width: no recompiles
            forward_pass(forward_step, mbs, model, dims)
        model.train(was_training)
    sums = torch.zeros(len(rows), fields, dtype=torch.float64)
    for i, v in values.items():
        sums[i] = v
    if dims.pp > 1:  # the values exist on the last stage
        sums = dims.comm("pp").broadcast(sums.to(device), src_group_rank=dims.pp - 1).cpu()
    if workers > 1:
        keep = torch.zeros(len(rows), 1, dtype=torch.float64)
        keep[mine] = 1.0
        sums = dims.comm("dp_cp").all_reduce((sums * keep).to(device)).cpu()
    return sums
