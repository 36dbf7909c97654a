"""Next-token logits while decoding on the training layout: incremental with a KV cache per microbatch (the
torch backend; each new token runs one position through the layout's forward-only schedule), or by
recomputing every row's whole prefix (the te backend, rows padded for sequence parallelism, and the
reference the tests compare against). Filled on the last pipeline stage; the sampler (generation/sampler.py)
draws the tokens. Under expert parallelism (`lockstep`, the ep group of a MoE model) every pass is padded to
the most microbatches any ep rank feeds (generation/ep_lockstep.py), so the all-to-alls match.
"""

from __future__ import annotations

import torch

from scaletrain.data.packing import block_causal_mask
from scaletrain.distributed.comm import Comm
from scaletrain.distributed.dims import ParallelDims
from scaletrain.generation.batching import left_padded, row_microbatches
from scaletrain.generation.ep_lockstep import agreed_max, padding_microbatch
from scaletrain.nn.kv_cache import KVCache
from scaletrain.trainer.step import forward_pass


def can_use_kv_cache(model: torch.nn.Module, width_multiple: int = 1) -> bool:
    """Incremental decoding runs on the torch backend's attention, with rows not padded for a sequence
    split (sequence parallelism is lifted for decoding, `sample_completions`); elsewhere each token
    recomputes."""
    return width_multiple == 1 and getattr(model, "backend", None) == "torch"


def gathered_last_logits(output: torch.Tensor, tp) -> torch.Tensor:
    final = output[:, -1].double()  # [b, vocab/tp] at the last position
    return (tp.all_gather(final, dim=-1) if tp is not None else final).cpu()


def recomputed_logits(model: torch.nn.Module, dims: ParallelDims, rows: list[list[int]], pad_id: int, micro_batch: int,
                       device: torch.device, tp, width_multiple: int,
                       lockstep: Comm | None = None) -> dict[int, torch.Tensor]:
    """Next-token logits of every row (full vocabulary), recomputing each row's whole prefix through
    the layout's forward-only schedule; filled on the last pipeline stage only. lockstep: pad the pass
    to the most microbatches of this ep group (collective over it)."""
    last: dict[int, torch.Tensor] = {}

    def forward_step(batch: dict[str, torch.Tensor], module: torch.nn.Module):
        logits = module(batch["tokens"], position_ids=batch["position_ids"],
                        attention_mask=block_causal_mask(batch["document_ids"]))

        def record(output: torch.Tensor):
            for r, values in zip(batch["row"].tolist(), gathered_last_logits(output, tp)):
                last[r] = values
            return output.new_zeros(()), {}

        return logits, record

    mbs = row_microbatches(left_padded(rows, pad_id, width_multiple), micro_batch, device) if rows else []
    mbs += [padding_microbatch(pad_id, width_multiple, device)] * (agreed_max(lockstep, len(mbs), device) - len(mbs))
    forward_pass(forward_step, mbs, model, dims)
    return last


class CachedLogits:
    """Incremental decoding with a KV cache per microbatch (each rank's holds the layers it runs): the
    first call runs the left-padded prompts, each later one only the token each running row took last,
    through the layout's forward-only schedule. Padding stays masked out. Finished rows leave their
    microbatch's cache (`KVCache.keep`) and an emptied microbatch leaves the pass, so the work per
    token follows the rows still running — except under interleaved pipelining, whose schedule needs
    whole groups of microbatches: there an emptied microbatch keeps one finished row (its outputs
    are ignored). Logits are filled on the last pipeline stage, for the rows fed. lockstep (the ep group
    of a MoE model): each pass is padded with one-row microbatches, run without a cache, to the most any
    rank of the group feeds (collective over it)."""

    def __init__(self, model: torch.nn.Module, dims: ParallelDims, rows: list[list[int]], pad_id: int, micro_batch: int,
                 device: torch.device, tp, max_new_tokens: int, lockstep: Comm | None = None) -> None:
        self.model, self.dims, self.micro_batch, self.device, self.tp = model, dims, micro_batch, device, tp
        self.lockstep, self.pad_id = lockstep, pad_id
        self.batch = left_padded(rows, pad_id)
        self.lengths = torch.tensor([len(r) for r in rows])
        capacity = self.batch["tokens"].shape[1] + max_new_tokens - 1  # the last sampled token is never fed
        self.caches = [KVCache(capacity) for _ in range(0, len(rows), micro_batch)]
        # The rows each cache holds, in its row order (all of a microbatch's at first).
        self.rows = [list(range(start, min(start + micro_batch, len(rows)))) for start in range(0, len(rows), micro_batch)]
        self.keep_microbatches = dims.vpp > 1  # interleaving: a fixed microbatch count

    def drop_finished(self, stopped: list[bool]) -> None:
        for cache, rows in zip(self.caches, self.rows):
            keep = [j for j, r in enumerate(rows) if not stopped[r]]
            if not keep and self.keep_microbatches:
                keep = [0]  # one finished row holds the microbatch's place in the schedule
            if len(keep) < len(rows):
                cache.keep(keep)
                rows[:] = [rows[j] for j in keep]

    def __call__(self, step: int, previous: list[int], stopped: list[bool]) -> dict[int, torch.Tensor]:
        b = self.batch
        if step == 0:
            tokens, positions, mask = b["tokens"], b["position_ids"], block_causal_mask(b["document_ids"])
        else:
            self.drop_finished(stopped)
            tokens = torch.tensor(previous)[:, None]
            positions = (self.lengths + step - 1)[:, None]
            b["document_ids"] = torch.cat([b["document_ids"], torch.zeros_like(tokens)], dim=1)
            mask = (b["document_ids"] == 0)[:, None, None, :]  # the prompt and every decoded token
        last: dict[int, torch.Tensor] = {}

        def forward_step(batch: dict[str, torch.Tensor], module: torch.nn.Module):
            m = int(batch["cache"])
            out = module(batch["tokens"], position_ids=batch["position_ids"], attention_mask=batch["mask"],
                         kv_cache=self.caches[m] if m >= 0 else None)

            def record(output: torch.Tensor):
                for r, values in zip(batch["row"].tolist(), gathered_last_logits(output, self.tp)):
                    last[r] = values
                return output.new_zeros(()), {}

            return out, record

        mbs = []
        for m, rows in enumerate(self.rows):
            if not rows:
                continue
            sl = torch.tensor(rows)
            mbs.append({"tokens": tokens[sl].to(self.device), "position_ids": positions[sl].to(self.device),
                        "mask": mask[sl].to(self.device), "cache": torch.tensor(m), "row": sl})
        for _ in range(agreed_max(self.lockstep, len(mbs), self.device) - len(mbs)):
            pad = padding_microbatch(self.pad_id, 1, self.device)
            mbs.append({"tokens": pad["tokens"], "position_ids": pad["position_ids"], "cache": torch.tensor(-1),
                        "mask": torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device), "row": pad["row"]})
        forward_pass(forward_step, mbs, self.model, self.dims)
        return last
