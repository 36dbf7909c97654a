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

from collections.abc import Sequence

import torch

from scaletrain.distributed.dims import ParallelDims
from scaletrain.generation.batching import contiguous_share, is_last_stage, pass_unit, split_over_cp
from scaletrain.generation.decoding import CachedLogits, can_use_kv_cache, recomputed_logits
from scaletrain.generation.ep_lockstep import agreed_max, lockstep_group
from scaletrain.parallel.context_parallel import cp_unbound
from scaletrain.parallel.parallelize import eager, sp_bound, sp_unbound


def stop_ids_for(tokenizer, stop_text: str | None) -> set[int]:
    """Token ids that end a completion: eos, and the end-of-turn marker where it is one token (a
    special token may decode to nothing, so the text check alone would miss it)."""
    ids = tokenizer.encode(stop_text) if stop_text else []
    return {tokenizer.eos_id, *(ids if len(ids) == 1 else [])}


def sampling_generator(seed: int, draw: int) -> torch.Generator:
    """The generator of one prompt draw (the draw-th prompt the run samples, over all steps)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + draw) % (2**63 - 1))


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
    # Expert parallelism: the ep group's ranks decode in lock step (generation/ep_lockstep.py); a rank whose
    # rows all stopped keeps feeding padding passes until every rank's have.
    lockstep = lockstep_group(model, dims)
    next_logits = CachedLogits(model, dims, rows, pad_id, micro_batch, device, tp, max_new_tokens,
                               lockstep) if cached else None
    was_training = model.training
    model.eval()
    try:
        # (lock step: as many steps as the ep group's longest budget; a finished rank runs padding passes)
        for step in range(agreed_max(lockstep, max_new_tokens, device)):
            idle = all(stopped) or step >= max_new_tokens  # only a lock-step padding pass is left to run
            with eager(), precision.autocast():  # a new shape every step: compiled blocks would recompile
                if next_logits is not None:
                    last = next_logits(step, [n[-1] if n else pad_id for n in new], [True] * len(rows) if idle
                                       else stopped)
                else:
                    last = recomputed_logits(model, dims, [] if idle else [r + n for r, n in zip(rows, new)], pad_id,
                                             micro_batch, device, tp, width_multiple, lockstep)
            if not idle:
                nxt = torch.full((len(rows),), pad_id, dtype=torch.long)
                if is_last_stage(dims):
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
            if not agreed_max(lockstep, int(not all(stopped) and step + 1 < max_new_tokens), device):
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
    mine = list(contiguous_share(len(prompts), dp, dp_rank))
    out: list[tuple[list[int], bool]] = []
    # (a replica without prompts skips the passes, its ranks agree on that; under expert parallelism its MoE
    # layers must join the ep group's: it decodes a repeat of prompt 0, dropped below)
    share = mine or ([0] if prompts and lockstep_group(model, dims) is not None else [])
    if share:
        unit = pass_unit(dims, micro_batch)
        padded = share + [share[-1]] * (-len(share) % unit)
        completions, stopped = sample_completions(
            model, dims, [prompts[i] for i in padded],
            None if seed is None else [sampling_generator(seed, i) for i in padded], group_size=group_size,
            micro_batch=micro_batch, **sampling)
        out = list(zip(completions, stopped))[: len(mine) * group_size]
    if dp > 1:
        out = [t for part in dims.comm("dp").all_gather_object(out) for t in part]  # type: ignore[union-attr,attr-defined]
    return [c for c, _ in out], [s for _, s in out]


