"""Packing several documents (conversations) into fixed-length sequences without cross-attention.

Each packed row carries `document_ids` (−1 on padding); position ids restart at 0 in every document
and the attention mask is block-diagonal causal, so a token sees only earlier tokens of its own
document — packing changes throughput, never the loss a document gets. The loss mask comes with each
document (e.g. 1 on assistant tokens only) and is 0 on padding and on each document's last token
(its label would belong to the next document).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scaletrain.nn.blockwise_attention import BlockwiseMask, document_mask


@dataclass
class Document:
    tokens: list[int]
    loss_mask: list[int]  # 1 where the *next* token is a training target


def pack(documents: Sequence[Document], seq_length: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """First-fit packing into rows of seq_length + 1 tokens (inputs and shifted labels).

    Documents longer than a row must be truncated by the caller (its truncation policy is reported
    there). Returns one dict per row: tokens, labels, loss_mask, position_ids, document_ids, [seq_length].
    """
    width = seq_length + 1
    rows: list[list[tuple[int, Document]]] = []
    free: list[int] = []
    for i, doc in enumerate(documents):
        if len(doc.tokens) > width:
            raise ValueError(f"document {i} has {len(doc.tokens)} tokens > seq_length + 1 = {width}; truncate it first")
        if len(doc.tokens) != len(doc.loss_mask):
            raise ValueError(f"document {i}: {len(doc.tokens)} tokens but {len(doc.loss_mask)} loss-mask entries")
        for r, room in enumerate(free):
            if len(doc.tokens) <= room:
                rows[r].append((i, doc))
                free[r] -= len(doc.tokens)
                break
        else:
            rows.append([(i, doc)])
            free.append(width - len(doc.tokens))
    out = []
    for row in rows:
        tokens, mask, pos, ids = [], [], [], []
        for i, doc in row:
            tokens += doc.tokens
            mask += doc.loss_mask[:-1] + [0]  # the last token's label is not in this document
            pos += list(range(len(doc.tokens)))
            ids += [i] * len(doc.tokens)
        pad = width - len(tokens)
        tokens += [pad_id] * pad
        mask += [0] * pad
        pos += [0] * pad
        ids += [-1] * pad
        t = torch.tensor(tokens)
        out.append({"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.tensor(mask[:-1]),
                    "position_ids": torch.tensor(pos[:-1]), "document_ids": torch.tensor(ids[:-1])})
    return out


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean mask (True = may attend): same document and not in the future. Padding
    attends to itself only, so no row is empty."""
    d = document_ids
    same = d[:, :, None] == d[:, None, :]
    s = d.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=d.device).tril()
    return ((same & causal) | torch.eye(s, dtype=torch.bool, device=d.device))[:, None]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | BlockwiseMask]:
    """Keyword inputs of the model for a microbatch: under context parallelism its positions and the
    mask to the gathered keys (parallel/context_parallel.shard_microbatch); packed rows their restarting
    positions and block-diagonal mask (`nn.document_mask`, the `block_causal_mask` below described
    instead of materialised); plain rows none (causal, positions 0…s−1)."""
    if "attention_mask" in batch:
        return {"position_ids": batch["position_ids"], "attention_mask": batch["attention_mask"]}
    if "document_ids" in batch:  # described, not materialised: CUDA runs it as a fused kernel (nn/attention.py)
        return {"position_ids": batch["position_ids"], "attention_mask": document_mask(batch["document_ids"])}
    return {}
