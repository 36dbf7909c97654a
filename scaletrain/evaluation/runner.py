"""Running evaluation tasks on a model in any layout: the per-kind scoring behind `scaletrain eval`
(commands/eval.py) and train.eval_tasks at validations (evaluation/during_training.py).

Log-likelihood kinds (perplexity, choice, preference) score through the forward-only schedule
(generation/likelihood.py); generation kinds (answer, refusal) decode greedily on the rollout sampler
(generation/sampler.py), prompts split over dp replicas. Collective over the world: every rank runs every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scaletrain.chat.renderer import BadConversation, ChatRenderer
from scaletrain.chat.rows import pair_messages, prompt_messages
from scaletrain.config.schema import RunConfig
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.distributed.dims import ParallelDims
from scaletrain.evaluation import samples as S
from scaletrain.evaluation import tasks as T
from scaletrain.evaluation.answers import math_answer
from scaletrain.evaluation.tasks import Task
from scaletrain.generation.likelihood import continuation_logprobs, continuation_token_logprobs, scores_at
from scaletrain.generation.sampler import completion_text, sample_share, stop_ids_for
from scaletrain.trainer.precision import Precision


@dataclass(frozen=True)
class EvalOptions:
    """How tasks are run: rows per forward, generation length, chat template override ('' / None: the model's),
    `--samples` file, refusal patterns file, whether choice tasks are chat-rendered."""

    batch_size: int
    max_new_tokens: int
    template: str | None = None
    samples: str | None = None
    refusal_patterns: str | None = None
    chat: bool = False


def run_task(task: Task, model: torch.nn.Module, dims: ParallelDims, cfg: RunConfig, args: EvalOptions,
             tokenizer: Tokenizer, template: str, precision: Precision, device: torch.device) -> dict[str, Any]:
    """One task's metrics: collective over the world (rows split over dp replicas, scored in the model's layout)."""
    seq = cfg.train.seq_length
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    width = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    common: dict[str, Any] = dict(micro_batch=args.batch_size, precision=precision, device=device, pad_id=pad, width_multiple=width)
    samples = args.samples if dims.is_main else None  # rank 0 appends every task's rows (evaluation/samples.py)
    if task.kind == "perplexity":
        rows, n_bytes = T.perplexity_rows(task, tokenizer, seq)
        documents = T.perplexity_documents(task, tokenizer)
        sums, counts = T.document_logprobs(documents, seq, continuation_token_logprobs(model, dims, rows, **common))
        if samples:
            S.append_samples(samples, S.perplexity_samples(task, documents, sums, counts))
        return T.perplexity_metrics(sums, counts, n_bytes)
    if task.kind == "choice":
        renderer = None
        if args.chat:
            renderer = ChatRenderer(tokenizer, args.template or template)
        rows = T.choice_rows(task, tokenizer, seq, renderer)
        logps, _ = continuation_logprobs(model, dims, rows, **common)
        if samples:
            S.append_samples(samples, S.choice_samples(task, rows, logps, tokenizer))
        return T.choice_metrics(task, logps)
    if task.kind == "preference":
        return preference_task(task, model, dims, tokenizer, args.template or template, seq, common,
                                reward_model=bool(cfg.model.num_labels))
    generations = generate_answers(task, model, dims, tokenizer, args.template or template, args, precision, device, width)
    if samples:
        texts = prompt_texts(task, tokenizer, args.template or template)
        S.append_samples(samples, S.generation_samples(task, texts, generations))
    if task.kind == "refusal":
        return T.refusal_metrics(task, [g[0] for g in generations], args.refusal_patterns)
    return answer_metrics(task, generations)


def answer_prompts(task: Task, tokenizer: Tokenizer, template: str, seq: int, max_new_tokens: int) -> list[list[int]]:
    """The chat-rendered generation prompts of an answer task, checked before the model is built."""
    renderer = ChatRenderer(tokenizer, template)
    prompts = []
    for i, row in enumerate(task.rows):
        try:
            prompts.append(renderer.prompt_ids(row.get("_shot_messages", []) + prompt_messages(row)))
        except BadConversation as e:
            raise ValueError(f"{task.name}: row {i}: {e}") from None
    too_long = sum(len(p) > seq + 1 - max_new_tokens for p in prompts)
    if too_long:
        raise ValueError(f"{task.name}: {too_long} prompts leave no room for --max-new-tokens {max_new_tokens} "
                         f"in {seq} tokens; raise --seq-length or lower --max-new-tokens")
    return prompts


def prompt_texts(task: Task, tokenizer: Tokenizer, template: str) -> list[str]:
    """The rendered text of each prompt of a generation task (the ids are task.prompts)."""
    renderer = ChatRenderer(tokenizer, template)
    return [renderer.text(row.get("_shot_messages", []) + prompt_messages(row), add_generation_prompt=True)
            for row in task.rows]


def generate_answers(task: Task, model: torch.nn.Module, dims: ParallelDims, tokenizer: Tokenizer, template: str,
                     args: EvalOptions, precision: Precision, device: torch.device,
                     width: int) -> list[tuple[str, int, bool, list[int]]]:
    """(text, completion tokens, truncated, completion ids) of a greedy completion per prompt of a generation
    task, on every rank (the prompts split over dp replicas, the completions gathered)."""
    marker = ChatRenderer(tokenizer, template).end_of_turn()
    stop_ids = stop_ids_for(tokenizer, marker)
    completions, stopped = sample_share(
        model, dims, task.prompts, seed=None, group_size=1, micro_batch=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=0.0, stop_ids=stop_ids, stop_text=marker,
        decode=tokenizer.decode, pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
        vocab_limit=tokenizer.vocab_size, precision=precision, device=device, width_multiple=width)
    return [(completion_text(c, tokenizer.decode, stop_ids, marker), len(c), not s, c)
            for c, s in zip(completions, stopped)]


def answer_metrics(task: Task, generations: list[tuple[str, int, bool, list[int]]]) -> dict[str, Any]:
    """Greedy completions checked by math_answer."""
    n = len(generations)
    right = sum(math_answer(g[0], row) for g, row in zip(generations, task.rows))
    return {"accuracy": right / n, "completion_tokens": sum(g[1] for g in generations) / n,
            "truncated": sum(g[2] for g in generations) / n, "questions": n}


def preference_task(task: Task, model: torch.nn.Module, dims: ParallelDims, tokenizer: Tokenizer, template: str,
                    seq: int, common: dict[str, Any], reward_model: bool) -> dict[str, Any]:
    """Chosen vs rejected, rendered as DPO and reward training render them (the response, its end-of-turn
    marker and eos are the continuation; a reward model reads its score at the last rendered token)."""
    renderer = ChatRenderer(tokenizer, template)
    rows = []
    for row in task.rows:
        for side in ("chosen", "rejected"):
            ids, target = renderer.render(pair_messages(row["prompt"], row[side]))
            if len(ids) + 1 > seq + 1:
                raise ValueError(f"{task.name}: a conversation of {len(ids) + 1} tokens exceeds --seq-length {seq}")
            start = max(i for i, t in enumerate(target) if t)  # the final response's first target token
            while start > 0 and target[start - 1]:
                start -= 1
            # eos after the response, as training closes it (a reward model always: its score is read before it)
            rows.append((ids + [tokenizer.eos_id] if reward_model else renderer.close(ids, target)[0], start))
    if reward_model:
        scores = scores_at(model, dims, [(ids[:-1], len(ids) - 2) for ids, _ in rows], **common)
        return T.preference_metrics(scores[0::2], scores[1::2])
    logps, counts = continuation_logprobs(model, dims, rows, **common)
    return T.preference_metrics(logps[0::2], logps[1::2], counts[0::2], counts[1::2])

