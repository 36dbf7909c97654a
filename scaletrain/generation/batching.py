"""Rows and passes for forward-only work on the training layout (sampling, scoring, reward models): left-padded
rows in which padding is a document of its own (block-diagonal mask; positions start at each row's first
token, so a padded row computes what the unpadded one would), microbatches tagged with their rows, the
unit a pass needs (whole pipeline groups under interleaving), the cp split of a replica's work, and the
training row of a prompt + completion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from scaletrain.distributed.dims import ParallelDims

T = TypeVar("T")


def left_padded(rows: Sequence[list[int]], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    document_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        tokens[i, width - n:] = torch.tensor(r)
        position_ids[i, width - n:] = torch.arange(n)
        document_ids[i, width - n:] = 0
    return {"tokens": tokens, "position_ids": position_ids, "document_ids": document_ids}


def row_microbatches(batch: dict[str, torch.Tensor], micro_batch: int, device: torch.device) -> list[dict]:
    n = batch["tokens"].shape[0]
    out = []
    for start in range(0, n, micro_batch):
        mb = {k: v[start:start + micro_batch].to(device) for k, v in batch.items()}
        mb["row"] = torch.arange(start, min(start + micro_batch, n), device=device)
        out.append(mb)
    return out


def is_last_stage(dims: ParallelDims) -> bool:
    return dims.pp_rank == dims.pp - 1


def pass_unit(dims: ParallelDims, micro_batch: int) -> int:
    """Rows a pass needs a multiple of: whole microbatches, and under interleaving whole pipeline groups."""
    return micro_batch * (dims.pp if dims.vpp > 1 else 1)


def contiguous_share(n: int, parts: int, index: int) -> range:
    """Part `index` of `parts` contiguous shares of n items, each ⌈n/parts⌉ long (the last ones shorter or
    empty): how rollouts, evaluation rows and sampled prompts are split over dp replicas and cp ranks, so a
    share never depends on anything but (n, parts, index)."""
    size = -(-n // parts)
    return range(min(index * size, n), min((index + 1) * size, n))


def split_over_cp(items: Sequence[T], dims: ParallelDims, fn: Callable[[list[T]], list[Any]], *, per_item: int = 1,
                  unit: int = 1, pad: Callable[[T], T] = lambda x: x) -> list[Any]:
    """fn over `items` (the same on every cp rank of a replica) with the work split over cp: cp rank c
    runs fn on its contiguous share — padded by copies (`pad`) of its last item until its per_item·share
    results are a multiple of `unit`, those results dropped — with the models' cp unbound by the caller;
    every cp rank gets all results, in item order. fn returns per_item results per item. Collective
    over cp (and whatever fn is collective over: the share's tp and pp ranks run it together)."""
    cp = dims.comm("cp")
    if cp.size == 1:
        return fn(list(items))
    share = contiguous_share(len(items), cp.size, cp.rank)
    mine = list(items[share.start:share.stop])
    out: list[Any] = []
    if mine:  # (a cp rank without items skips the passes: its tp and pp ranks agree on that)
        padded = mine + [pad(mine[-1]) for _ in range(_padding(len(mine), per_item, unit))]
        out = fn(padded)[: len(mine) * per_item]
    return [r for part in cp.all_gather_object(out) for r in part]  # type: ignore[union-attr,attr-defined]


def _padding(n: int, per_item: int, unit: int) -> int:
    k = 0
    while ((n + k) * per_item) % unit:
        k += 1
    return k


def training_rows(prompt: list[int], completion: list[int], seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """prompt + completion as one right-padded training row: tokens, labels, loss_mask (1 where the
    label is a completion token), position_ids, document_ids (−1 on padding) — all [seq_length]."""
    full = prompt + completion
    if len(full) > seq_length + 1:
        raise ValueError(f"prompt + completion = {len(full)} tokens > train.seq_length + 1 = {seq_length + 1}")
    n = len(full) - 1
    pad = seq_length - n
    tokens = torch.tensor(full[:-1] + [pad_id] * pad)
    labels = torch.tensor(full[1:] + [pad_id] * pad)
    mask = torch.zeros(seq_length, dtype=torch.long)
    mask[len(prompt) - 1:n] = 1
    position_ids = torch.cat([torch.arange(n), torch.zeros(pad, dtype=torch.long)])
    document_ids = torch.cat([torch.zeros(n, dtype=torch.long), torch.full((pad,), -1, dtype=torch.long)])
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": position_ids,
            "document_ids": document_ids}
