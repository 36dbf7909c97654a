"""Rollouts on the training layout: sample completions from the policy as it is sharded for training
(tp, pp), and per-token log-probs of finished rows, through the same forward-only schedules.

Each dp replica samples its own prompts; within a replica every rank runs the same loop (tp ranks
hold identical inputs, pipeline stages pass activations as in training). Rows are left-padded to
one width (a pipeline pass has one activation shape): the padding is a document of its own
(block-diagonal mask, data/packing.py) and position ids start at 0 at each prompt's first
token, so a padded row computes what the unpadded one would.

Sampling happens on the last pipeline stage: it gathers the last position's logits over tp (rows ×
vocabulary, small), samples with one torch.Generator per prompt seeded from (run seed, global prompt
draw) — so completions depend neither on the layout nor on which dp rank draws the prompt, and a
resumed run samples what the uninterrupted one would — then broadcasts the new tokens over pp.

Under context parallelism the weights are whole on every cp rank, and decoding one token at a time
gains nothing from a split sequence: each cp rank samples its contiguous share of the replica's
prompts with cp unbound (parallel/context_parallel.py `cp_unbound`), then the replica's ranks
gather every share over cp, so the rows the training step splits are the same on every cp rank.
Per-token log-probs of finished rows run in the cp layout and are gathered back to whole rows.

On the torch backend decoding is incremental: each rank keeps a KV cache per microbatch for the
layers it holds, the first pass runs the left-padded prompts and every later one only the token each
row took last, through the layout's forward-only schedule (pipeline stages pass [b, 1, h]
activations). Under sequence parallelism SP is lifted for the rollout (`parallelize.sp_unbound`: one
new token cannot be split over tp; plain tp computes the same values). On the te backend each new
token recomputes its prefix through the schedule (O(length²), exact), the reference `kv_cache=False`
also takes. Both give the same tokens (tested at one process, tp2+SP, pp2 and tp2·pp2+SP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from scaletrain.data.packing import block_causal_mask, model_inputs
from scaletrain.distributed.dims import ParallelDims
from scaletrain.nn import cross_entropy_per_token
from scaletrain.nn.kv_cache import KVCache
from scaletrain.parallel.context_parallel import cp_unbound, gather_sequence, shard_microbatch
from scaletrain.parallel.parallelize import eager, sp_bound, sp_unbound
from scaletrain.trainer.step import forward_pass


def stop_ids_for(tokenizer, stop_text: str | None) -> set[int]:
    """Token ids that end a completion: eos, and the end-of-turn marker where it is one token (a
    special token may decode to nothing, so the text check alone would miss it)."""
    ids = tokenizer.encode(stop_text) if stop_text else []
    return {tokenizer.eos_id, *(ids if len(ids) == 1 else [])}


def sampling_generator(seed: int, draw: int) -> torch.Generator:
    """The generator of one prompt draw (the draw-th prompt the run samples, over all steps)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + draw) % (2**63 - 1))


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


def _is_last_stage(dims: ParallelDims) -> bool:
    return dims.pp_rank == dims.pp - 1


def pass_unit(dims: ParallelDims, micro_batch: int) -> int:
    """Rows a pass needs a multiple of: whole microbatches, and under interleaving whole pipeline groups."""
    return micro_batch * (dims.pp if dims.vpp > 1 else 1)


T = TypeVar("T")


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
    per_rank = -(-len(items) // cp.size)
    mine = list(items[cp.rank * per_rank:(cp.rank + 1) * per_rank])
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


def _copy_generator(gen: torch.Generator | None) -> torch.Generator | None:
    """A padding row's generator: a copy, so the real prompt's own draws are not advanced twice."""
    if gen is None:
        return None
    twin = torch.Generator()
    twin.set_state(gen.get_state())
    return twin


@torch.no_grad()
def sample_completions(model: torch.nn.Module, dims: ParallelDims, prompts: Sequence[list[int]],
                       generators: Sequence[torch.Generator] | None,
                       *, group_size: int, max_new_tokens: int, temperature: float,
                       stop_ids: set[int], stop_text: str | Sequence[str] | None = None, decode=None, pad_id: int,
                       vocab_limit: int, micro_batch: int, precision, device: torch.device,
                       width_multiple: int = 1, kv_cache: bool | None = None) -> tuple[list[list[int]], list[bool]]:
    """`group_size` sampled completions per prompt, in prompt order (prompt i's are rows i·G … i·G+G−1);
    temperature 0 (generators None) decodes greedily.

    A completion stops at a token in `stop_ids` (eos, a one-token end-of-turn marker) or once its
    decoded text contains `stop_text` (a marker the tokenizer splits into pieces, which need not
    tokenise alone as in context; or several strings, any of which stops); the stopping token is kept (the
    model learns to stop). Returns
    (completion token ids, stopped: False where max_new_tokens ran out). Collective over tp and pp of
    this replica; identical on its ranks. width_multiple: rows are padded to a multiple of it (tp under
    sequence parallelism, which shards the sequence) where each token recomputes its prefix. kv_cache:
    None picks incremental decoding where it can run (`can_use_kv_cache`; SP is lifted for it), False
    always recomputes (the reference for tests and benchmarks).
    """
    if kv_cache is not False and sp_bound(model):
        # Sequence parallelism splits rows over tp, a decoded token cannot be: decode with plain tp.
        with sp_unbound(model):
            return sample_completions(model, dims, prompts, generators, group_size=group_size,
                                      max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stop_ids,
                                      stop_text=stop_text, decode=decode, pad_id=pad_id, vocab_limit=vocab_limit,
                                      micro_batch=micro_batch, precision=precision, device=device, width_multiple=1,
                                      kv_cache=kv_cache)
    if dims.cp == 1:
        return _sample_replica(model, dims, prompts, generators, group_size=group_size, max_new_tokens=max_new_tokens,
                               temperature=temperature, stop_ids=stop_ids, stop_text=stop_text, decode=decode,
                               pad_id=pad_id, vocab_limit=vocab_limit, micro_batch=micro_batch, precision=precision,
                               device=device, width_multiple=width_multiple, kv_cache=kv_cache)
    # Context parallelism: each cp rank samples its share of the prompts on whole sequences.
    items = list(zip(prompts, generators if generators is not None else [None] * len(prompts)))

    def sample(share: list[tuple[list[int], torch.Generator | None]]) -> list[tuple[list[int], bool]]:
        gens = None if generators is None else [gen for _, gen in share if gen is not None]
        new, stopped = _sample_replica(
            model, dims, [p for p, _ in share], gens, group_size=group_size, max_new_tokens=max_new_tokens,
            temperature=temperature, stop_ids=stop_ids, stop_text=stop_text, decode=decode, pad_id=pad_id,
            vocab_limit=vocab_limit, micro_batch=micro_batch, precision=precision, device=device,
            width_multiple=width_multiple, kv_cache=kv_cache)
        return list(zip(new, stopped))

    with cp_unbound(model):
        out = split_over_cp(items, dims, sample, per_item=group_size, unit=pass_unit(dims, micro_batch),
                            pad=lambda it: (it[0], _copy_generator(it[1])))
    return [c for c, _ in out], [s for _, s in out]


@torch.no_grad()
def _sample_replica(model: torch.nn.Module, dims: ParallelDims, prompts: Sequence[list[int]],
                    generators: Sequence[torch.Generator] | None,
                    *, group_size: int, max_new_tokens: int, temperature: float,
                    stop_ids: set[int], stop_text: str | Sequence[str] | None, decode, pad_id: int, vocab_limit: int,
                    micro_batch: int, precision, device: torch.device,
                    width_multiple: int, kv_cache: bool | None) -> tuple[list[list[int]], list[bool]]:
    """`sample_completions` on this replica's tp and pp ranks, with no cp split."""
    tp = dims.tp_comm
    pp = dims.comm("pp") if dims.pp > 1 else None
    rows = [list(p) for p in prompts for _ in range(group_size)]
    new: list[list[int]] = [[] for _ in rows]
    stopped = [False] * len(rows)
    if kv_cache and not can_use_kv_cache(model, width_multiple):
        raise ValueError("kv_cache=True needs the torch backend and unpadded rows (width_multiple 1: "
                         "sample_completions lifts sequence parallelism for it)")
    cached = can_use_kv_cache(model, width_multiple) if kv_cache is None else kv_cache
    next_logits = _CachedLogits(model, dims, rows, pad_id, micro_batch, device, tp, max_new_tokens) if cached else None
    was_training = model.training
    model.eval()
    try:
        for step in range(max_new_tokens):
            with eager(), precision.autocast():  # a new shape every step: compiled blocks would recompile
                if next_logits is not None:
                    last = next_logits(step, [n[-1] if n else pad_id for n in new], stopped)
                else:
                    last = _recomputed_logits(model, dims, [r + n for r, n in zip(rows, new)], pad_id, micro_batch,
                                              device, tp, width_multiple)
            nxt = torch.full((len(rows),), pad_id, dtype=torch.long)
            if _is_last_stage(dims):
                # Rows that finished were dropped from the cached passes: a placeholder keeps every
                # generator's draws where they were (a row's draw does not depend on its neighbours').
                filler = torch.zeros_like(next(iter(last.values())))
                logits = torch.stack([last.get(r, filler) for r in range(len(rows))])[:, :vocab_limit]
                if temperature == 0 or generators is None:
                    nxt = logits.argmax(dim=-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    for g, gen in enumerate(generators):  # one generator per prompt: layout-independent draws
                        sl = slice(g * group_size, (g + 1) * group_size)
                        nxt[sl] = torch.multinomial(probs[sl], 1, generator=gen)[:, 0]
            if pp is not None:
                nxt = pp.broadcast(nxt.to(device), src_group_rank=dims.pp - 1).cpu()
            for i, t in enumerate(nxt.tolist()):
                if stopped[i]:
                    continue
                new[i].append(t)
                stopped[i] = t in stop_ids or _has_stop_text(decode, new[i], stop_text)
            if all(stopped):
                break
    finally:
        model.train(was_training)
    return new, stopped


def _has_stop_text(decode, completion: list[int], stop_text: str | Sequence[str] | None) -> bool:
    if not stop_text:
        return False
    text = decode(completion)
    return stop_text in text if isinstance(stop_text, str) else any(s in text for s in stop_text)


def completion_text(completion: list[int], decode, stop_ids: set[int], stop_text: str | None) -> str:
    """What a completion says: its text before its stop token or the end-of-turn marker."""
    if completion and completion[-1] in stop_ids:
        completion = completion[:-1]
    text = decode(completion)
    return text.split(stop_text, 1)[0] if stop_text else text


def sample_share(model: torch.nn.Module, dims: ParallelDims, prompts: Sequence[list[int]], *, seed: int | None, group_size: int,
                 micro_batch: int, **sampling) -> tuple[list[list[int]], list[bool]]:
    """`sample_completions` over all of `prompts` with the work split over dp: each replica samples its
    contiguous share (padded to whole microbatches, interleaved: whole pipeline groups), then every rank
    gathers everyone's. seed: one sampling generator per prompt index (None: greedy). Collective over the world."""
    dp, dp_rank = dims.dp, dims.dp_rank
    per_rank = -(-len(prompts) // dp)
    mine = list(range(dp_rank * per_rank, min((dp_rank + 1) * per_rank, len(prompts))))
    out: list[tuple[list[int], bool]] = []
    if mine:  # (a replica without prompts skips the passes: its ranks agree on that)
        unit = pass_unit(dims, micro_batch)
        padded = mine + [mine[-1]] * (-len(mine) % unit)
        completions, stopped = sample_completions(
            model, dims, [prompts[i] for i in padded],
            None if seed is None else [sampling_generator(seed, i) for i in padded], group_size=group_size,
            micro_batch=micro_batch, **sampling)
        out = list(zip(completions, stopped))[: len(mine) * group_size]
    if dp > 1:
        out = [t for part in dims.comm("dp").all_gather_object(out) for t in part]  # type: ignore[union-attr,attr-defined]
    return [c for c, _ in out], [s for _, s in out]


def can_use_kv_cache(model: torch.nn.Module, width_multiple: int = 1) -> bool:
    """Incremental decoding runs on the torch backend's attention, with rows not padded for a sequence
    split (sequence parallelism is lifted for decoding, `sample_completions`); elsewhere each token
    recomputes."""
    return width_multiple == 1 and getattr(model, "backend", None) == "torch"


def gathered_last_logits(output: torch.Tensor, tp) -> torch.Tensor:
    final = output[:, -1].double()  # [b, vocab/tp] at the last position
    return (tp.all_gather(final, dim=-1) if tp is not None else final).cpu()


def _recomputed_logits(model: torch.nn.Module, dims: ParallelDims, rows: list[list[int]], pad_id: int, micro_batch: int,
                       device: torch.device, tp, width_multiple: int) -> dict[int, torch.Tensor]:
    """Next-token logits of every row (full vocabulary), recomputing each row's whole prefix through
    the layout's forward-only schedule; filled on the last pipeline stage only."""
    last: dict[int, torch.Tensor] = {}

    def forward_step(batch: dict[str, torch.Tensor], module: torch.nn.Module):
        logits = module(batch["tokens"], position_ids=batch["position_ids"],
                        attention_mask=block_causal_mask(batch["document_ids"]))

        def record(output: torch.Tensor):
            for r, values in zip(batch["row"].tolist(), gathered_last_logits(output, tp)):
                last[r] = values
            return output.new_zeros(()), {}

        return logits, record

    batch = left_padded(rows, pad_id, width_multiple)
    forward_pass(forward_step, row_microbatches(batch, micro_batch, device), model, dims)
    return last


class _CachedLogits:
    """Incremental decoding with a KV cache per microbatch (each rank's holds the layers it runs): the
    first call runs the left-padded prompts, each later one only the token each running row took last,
    through the layout's forward-only schedule. Padding stays masked out. Finished rows leave their
    microbatch's cache (`KVCache.keep`) and an emptied microbatch leaves the pass, so the work per
    token follows the rows still running — except under interleaved pipelining, whose schedule needs
    whole groups of microbatches: there an emptied microbatch keeps one finished row (its outputs
    are ignored). Logits are filled on the last pipeline stage, for the rows fed."""

    def __init__(self, model: torch.nn.Module, dims: ParallelDims, rows: list[list[int]], pad_id: int, micro_batch: int,
                 device: torch.device, tp, max_new_tokens: int) -> None:
        self.model, self.dims, self.micro_batch, self.device, self.tp = model, dims, micro_batch, device, tp
        self.batch = left_padded(rows, pad_id)
        self.lengths = torch.tensor([len(r) for r in rows])
        capacity = self.batch["tokens"].shape[1] + max_new_tokens - 1  # the last sampled token is never fed
        self.caches = [KVCache(capacity) for _ in range(0, len(rows), micro_batch)]
        # The rows each cache holds, in its row order (all of a microbatch's at first).
        self.rows = [list(range(start, min(start + micro_batch, len(rows)))) for start in range(0, len(rows), micro_batch)]
        self.keep_microbatches = dims.vpp > 1  # interleaving: a fixed microbatch count

    def _drop_finished(self, stopped: list[bool]) -> None:
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
            self._drop_finished(stopped)
            tokens = torch.tensor(previous)[:, None]
            positions = (self.lengths + step - 1)[:, None]
            b["document_ids"] = torch.cat([b["document_ids"], torch.zeros_like(tokens)], dim=1)
            mask = (b["document_ids"] == 0)[:, None, None, :]  # the prompt and every decoded token
        last: dict[int, torch.Tensor] = {}

        def forward_step(batch: dict[str, torch.Tensor], module: torch.nn.Module):
            out = module(batch["tokens"], position_ids=batch["position_ids"], attention_mask=batch["mask"],
                         kv_cache=self.caches[int(batch["cache"])])

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
        forward_pass(forward_step, mbs, self.model, self.dims)
        return last


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


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, dims: ParallelDims, microbatches: list[dict], *, temperature: float, precision,
                   fused_cross_entropy: bool = False) -> list[torch.Tensor]:
    """Per-token log-probs of each microbatch's labels, [M, s] each (fp32 or wider), under `model` (a frozen
    reference) at sampling temperature. Exact on the last pipeline stage (where the loss needs
    them); zeros elsewhere. Collective over tp and pp."""
    tp = dims.tp_comm
    out: dict[int, torch.Tensor] = {}

    def forward_step(batch: dict[str, torch.Tensor], module: torch.nn.Module):
        logits = module(batch["tokens"], **model_inputs(batch))

        def record(output: torch.Tensor):
            scaled = output if temperature == 1.0 else output / temperature
            out[int(batch["mb"])] = -cross_entropy_per_token(scaled, batch["labels"], tp, fused=fused_cross_entropy)
            return output.new_zeros(()), {}

        return logits, record

    return per_token_pass(model, dims, microbatches, forward_step, out, precision=precision)


def per_token_pass(model: torch.nn.Module, dims: ParallelDims, microbatches: list[dict], forward_step, out: dict[int, torch.Tensor],
                   *, precision) -> list[torch.Tensor]:
    """A forward-only pass whose `forward_step` records per-token values [M, s(/cp)] of microbatch i in
    out[i] on the last pipeline stage: run in eval mode, under cp on each rank's share of the rows
    (the microbatches, replicated over cp, are split here) and gathered back to whole rows [M, s] on
    every cp rank. Zeros on the other stages. Collective over tp, cp and pp."""
    cp = dims.comm("cp") if dims.cp > 1 else None
    tagged = [{**mb, "mb": torch.tensor(i)} for i, mb in enumerate(microbatches)]
    if cp is not None:
        tagged = [shard_microbatch(mb, cp) for mb in tagged]
    was_training = model.training
    model.eval()
    try:
        with precision.autocast():
            forward_pass(forward_step, tagged, model, dims)
    finally:
        model.train(was_training)
    result = []
    for i, mb in enumerate(microbatches):
        if i in out:
            result.append(gather_sequence(out[i], cp))
        else:  # not the last stage: nothing computed (its ranks never read these)
            result.append(torch.zeros(mb["tokens"].shape, dtype=torch.float64, device=mb["tokens"].device))
    return result
