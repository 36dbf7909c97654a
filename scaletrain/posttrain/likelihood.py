"""Log-likelihoods of continuations under a (frozen) model in any parallel layout.

`continuation_logprobs` is the one primitive evaluation needs besides generation: for rows
(token ids, start) it returns Σ log p(ids[start:] | ids[:start]) per row and the number of scored
tokens, through the layout's forward-only schedule and the vocab-parallel cross-entropy (the
vocabulary is never gathered). Rows are right-padded per microbatch (padding is its own document,
so it changes no score); the values are exact on the last pipeline stage and broadcast over pp, so
every rank of the replica returns them. Under data parallelism each replica scores its contiguous
share of the rows and the shares are summed over dp: every rank returns every row's score. Under
pipeline parallelism every microbatch of a pass has the pass's longest row's width (the stages agree
on one activation shape); otherwise each is as wide as its own longest row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scaletrain.nn import cross_entropy_per_token
from scaletrain.posttrain.packing import block_causal_mask
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
def continuation_logprobs(model: torch.nn.Module, dims, rows: Sequence[tuple[list[int], int]], *, micro_batch: int,
                          precision, device: torch.device, pad_id: int,
                          width_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] float64 Σ log p of each row's continuation, [n] int64 its token count), on every rank.

    rows: (ids, start) with 1 ≤ start < len(ids): ids[start:] is scored given ids[:start]. Collective
    over the whole world (tp and pp within a replica, then dp). width_multiple: rows padded to a
    multiple of it (tp under sequence parallelism)."""
    for ids, start in rows:
        if not 1 <= start < len(ids):
            raise ValueError(f"a row of {len(ids)} tokens cannot score from position {start}")
    dp, dp_rank = (dims.dp, dims.dp_rank) if dims is not None else (1, 0)
    per_rank = -(-len(rows) // dp)
    mine = list(range(dp_rank * per_rank, min((dp_rank + 1) * per_rank, len(rows))))
    sums = torch.zeros(len(rows), 2, dtype=torch.float64)
    tp = dims.tp_comm if dims is not None else None
    if mine:  # (a replica with no rows skips its passes; its ranks agree on that)
        unit = micro_batch * (dims.pp if dims is not None and dims.vpp > 1 else 1)
        padded = mine + [mine[-1]] * (-len(mine) % unit)  # whole (interleaved: whole groups of) microbatches
        chunks = [padded[s:s + micro_batch] for s in range(0, len(padded), micro_batch)]
        widths = [max(len(rows[i][0]) - 1 for i in chunk) for chunk in chunks]
        if dims is not None and dims.pp > 1:  # stages exchange activations of one agreed shape per pass
            widths = [max(widths)] * len(widths)
        mbs = [_microbatch([rows[i] for i in chunk], chunk, pad_id, w + -w % width_multiple)
               for chunk, w in zip(chunks, widths)]
        mbs = [{k: v.to(device) for k, v in mb.items()} for mb in mbs]

        def forward_step(batch: dict[str, torch.Tensor], module: torch.nn.Module):
            logits = module(batch["tokens"], position_ids=batch["position_ids"],
                            attention_mask=block_causal_mask(batch["document_ids"]))

            def record(output: torch.Tensor):
                logp = -cross_entropy_per_token(output, batch["labels"], tp)
                m = batch["loss_mask"].to(logp.dtype)
                sums[batch["index"].cpu(), 0] = (logp * m).sum(-1).double().cpu()  # repeats only overwrite
                sums[batch["index"].cpu(), 1] = m.sum(-1).double().cpu()
                return output.new_zeros(()), {}

            return logits, record

        was_training = model.training
        model.eval()
        with precision.autocast():
            forward_pass(forward_step, mbs, model, dims)
        model.train(was_training)
    if dims is not None:
        if dims.pp > 1:  # the values exist on the last stage
            sums = dims.comm("pp").broadcast(sums.to(device), src_group_rank=dims.pp - 1).cpu()
        if dims.dp > 1:
            keep = torch.zeros(len(rows), 1, dtype=torch.float64)
            keep[mine] = 1.0
            sums = dims.comm("dp").all_reduce((sums * keep).to(device)).cpu()
    return sums[:, 0], sums[:, 1].long()
