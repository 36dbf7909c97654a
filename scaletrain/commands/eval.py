"""`scaletrain eval`: score a model on local evaluation files, in any tensor / pipeline / data layout.

    scaletrain eval runs/tiny --task perplexity:held_out.jsonl --task choice:mc.jsonl
    torchrun --nproc_per_node 4 -m scaletrain.cli eval runs/big --task answer:data/arith/sft_test.jsonl \\
        --set parallel.tp=2 --set parallel.pp=2 --output results.json

MODEL is a run directory, its checkpoints/ folder, a step_* checkpoint or a Hugging Face directory. The
model is built frozen in the layout the `--set parallel.*` keys give (the world size must be a multiple of
tp·pp; the rest is dp, each replica scoring a share of the rows) and every score comes from the
forward-only schedule (generation/likelihood.py) or the rollout sampler (generation/rollout.py). The chat
template of `answer` tasks is the run's (its config.toml) or the HF tokenizer's. Rank 0 prints one line
per task and writes --output (JSON: the metrics, the model, the layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from scaletrain.evaluation.tasks import KINDS
from scaletrain.model_builder import model_files


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory, its checkpoints/ folder, a step_* checkpoint or a Hugging Face "
                                 "model directory")
    p.add_argument("--task", action="append", default=[], metavar="KIND:FILE", required=True,
                   help=f"a task (repeatable); KIND: {', '.join(KINDS)}")
    p.add_argument("--seq-length", type=int, default=0,
                   help="longest scored row / perplexity window (default: the model's max_position_embeddings, "
                        "else 2048)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (micro batch)")
    p.add_argument("--limit", type=int, default=0, help="first N rows of each task only (0: all)")
    p.add_argument("--shots", type=int, default=0, help="choice / answer tasks: k solved examples from the task's "
                                                       "other rows before each question (default 0)")
    p.add_argument("--shot-seed", type=int, default=0, help="which examples are drawn as shots")
    p.add_argument("--chat", action="store_true",
                   help="choice tasks: ask in the chat template (question as the user turn, choices as the reply; "
                        "shots as earlier exchanges) — for instruction-tuned models")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer tasks: longest completion")
    p.add_argument("--template", default=None, help="answer tasks: chat template (auto, chatml, llama3 or Jinja; "
                                                    "default: the run's, else the tokenizer's)")
    p.add_argument("--config", default=None, help="a run file whose [parallel] / [precision] sections apply")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="e.g. --set parallel.tp=2 --set precision.dtype=bfloat16")
    p.add_argument("--refusal-patterns", default=None,
                   help="refusal tasks: a file of regular expressions (one per line, case-insensitive) that mark a "
                        "completion as a refusal (default: evaluation/tasks.py's REFUSAL_PATTERNS)")
    p.add_argument("--samples", default=None,
                   help="append one jsonl row per question (choice: every choice's log-likelihood, the picked and "
                        "gold index), document (perplexity: log-likelihood sum and token count) or completion "
                        "(answer, refusal) here, token ids beside the text")
    p.add_argument("--output", default=None, help="write the results as JSON here (rank 0)")


def eval_command(args: argparse.Namespace) -> int:
    from scaletrain.config import ConfigError, load_config
    from scaletrain.evaluation.tasks import add_shots, parse_task

    try:
        tasks = [parse_task(t, args.limit or None) for t in args.task]
        for task in tasks:
            add_shots(task, args.shots, args.shot_seed)
        kind, m, tok_dir, template = model_files(args.model)
        not_for_scores = [t.name for t in tasks if t.kind != "preference"]
        if m.num_labels and not_for_scores:
            raise ConfigError(f"{args.model} is a reward model (a score head): it has no token probabilities for "
                              f"{', '.join(not_for_scores)}; it evaluates on preference tasks only")
        seq = args.seq_length or m.max_position_embeddings or 2048
        cfg = load_config(args.config, [*args.overrides, f"train.seq_length={seq}"])
        cfg = dataclasses.replace(cfg, model=m)
        from scaletrain.distributed import read_env
        from scaletrain.model_builder import check_frozen_model

        env = read_env()
        p = cfg.parallel
        if env.world_size % (p.tp * p.pp * p.cp):
            raise ConfigError(f"evaluation runs at tp·pp·cp = {p.tp}·{p.pp}·{p.cp} on world size {env.world_size}: "
                              f"launch a multiple of {p.tp * p.pp * p.cp} processes (extra processes are data-parallel "
                              "replicas; evaluation rows are scored whole, the cp ranks taking shares of them)")
        from scaletrain.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(str(tok_dir))
        check_frozen_model(cfg, "model", args.model, role="model", tokenizer_vocab=tokenizer.vocab_size)
        for task in tasks:
            if task.kind in ("answer", "refusal"):
                task.prompts = _answer_prompts(task, tokenizer, args.template or template, seq, args.max_new_tokens)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        return 2
    results = _evaluate(cfg, args, tasks, tokenizer, template)
    if results is not None:
        for name, metrics in results["tasks"].items():
            print(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v:,}"
                                          for k, v in metrics.items()))
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=2))
            print(f"wrote {args.output}")
    return 0


def _evaluate(cfg, args: argparse.Namespace, tasks, tokenizer, template: str) -> dict | None:
    """Every task's metrics (None on ranks other than 0)."""
    from scaletrain.model_builder import build_frozen_model, frozen_runtime

    with frozen_runtime(cfg) as (dims, precision, device, backend):
        model, line = build_frozen_model(cfg, "model", args.model, dims=dims, precision=precision, device=device,
                                         backend=backend)
        if dims.is_main:
            print(f"scaletrain eval: {line}; layout tp{dims.tp}·pp{dims.pp}·cp{dims.cp}·dp{dims.dp}; precision {precision.name}; "
                  f"rows of up to {cfg.train.seq_length} tokens", flush=True)
            if args.chat or any(t.kind in ("answer", "refusal", "preference") for t in tasks):
                from scaletrain.chat.renderer import ChatRenderer

                print(f"chat template: {ChatRenderer(tokenizer, args.template or template).origin}", flush=True)
        out: dict[str, Any] = {}
        for task in tasks:
            t0 = time.perf_counter()
            out[task.name] = {**_run_task(task, model, dims, cfg, args, tokenizer, template, precision, device),
                              "seconds": round(time.perf_counter() - t0, 3)}
    if not dims.is_main:
        return None
    return {"model": str(args.model), "layout": {"tp": dims.tp, "pp": dims.pp, "cp": dims.cp, "dp": dims.dp},
            "shots": args.shots,
            "chat": args.chat,
            "seq_length": cfg.train.seq_length, "precision": precision.name, "tasks": out}


def _run_task(task, model, dims, cfg, args, tokenizer, template, precision, device) -> dict[str, Any]:
    from scaletrain.evaluation import samples as S
    from scaletrain.evaluation import tasks as T
    from scaletrain.generation.likelihood import continuation_logprobs, continuation_token_logprobs

    seq = cfg.train.seq_length
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    width = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    common = dict(micro_batch=args.batch_size, precision=precision, device=device, pad_id=pad, width_multiple=width)
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
        if getattr(args, "chat", False):
            from scaletrain.chat.renderer import ChatRenderer

            renderer = ChatRenderer(tokenizer, args.template or template)
        rows = T.choice_rows(task, tokenizer, seq, renderer)
        logps, _ = continuation_logprobs(model, dims, rows, **common)
        if samples:
            S.append_samples(samples, S.choice_samples(task, rows, logps, tokenizer))
        return T.choice_metrics(task, logps)
    if task.kind == "preference":
        return _preference_task(task, model, dims, tokenizer, args.template or template, seq, common,
                                reward_model=bool(cfg.model.num_labels))
    generations = _generate(task, model, dims, tokenizer, args.template or template, args, precision, device, width)
    if samples:
        texts = _prompt_texts(task, tokenizer, args.template or template)
        S.append_samples(samples, S.generation_samples(task, texts, generations))
    if task.kind == "refusal":
        return T.refusal_metrics(task, [g[0] for g in generations], args.refusal_patterns)
    return _answer_task(task, generations)


def _answer_prompts(task, tokenizer, template: str, seq: int, max_new_tokens: int) -> list[list[int]]:
    """The chat-rendered generation prompts of an answer task, checked before the model is built."""
    from scaletrain.chat.renderer import BadConversation, ChatRenderer
    from scaletrain.stages.rl.prompts import prompt_messages

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


def _prompt_texts(task, tokenizer, template: str) -> list[str]:
    """The rendered text of each prompt of a generation task (the ids are task.prompts)."""
    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.stages.rl.prompts import prompt_messages

    renderer = ChatRenderer(tokenizer, template)
    return [renderer.text(row.get("_shot_messages", []) + prompt_messages(row), add_generation_prompt=True)
            for row in task.rows]


def _generate(task, model, dims, tokenizer, template, args, precision, device,
              width) -> list[tuple[str, int, bool, list[int]]]:
    """(text, completion tokens, truncated, completion ids) of a greedy completion per prompt of a generation
    task, on every rank (the prompts split over dp replicas, the completions gathered)."""
    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.generation.rollout import completion_text, sample_share, stop_ids_for

    marker = ChatRenderer(tokenizer, template).end_of_turn()
    stop_ids = stop_ids_for(tokenizer, marker)
    completions, stopped = sample_share(
        model, dims, task.prompts, seed=None, group_size=1, micro_batch=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=0.0, stop_ids=stop_ids, stop_text=marker,
        decode=tokenizer.decode, pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
        vocab_limit=tokenizer.vocab_size, precision=precision, device=device, width_multiple=width)
    return [(completion_text(c, tokenizer.decode, stop_ids, marker), len(c), not s, c)
            for c, s in zip(completions, stopped)]


def _answer_task(task, generations) -> dict[str, Any]:
    """Greedy completions checked by math_answer."""
    from scaletrain.stages.rl.rewards import math_answer

    n = len(generations)
    right = sum(math_answer(g[0], row) for g, row in zip(generations, task.rows))
    return {"accuracy": right / n, "completion_tokens": sum(g[1] for g in generations) / n,
            "truncated": sum(g[2] for g in generations) / n, "questions": n}


def _preference_task(task, model, dims, tokenizer, template: str, seq: int, common: dict,
                     reward_model: bool) -> dict[str, Any]:
    """Chosen vs rejected, rendered as DPO and reward training render them (the response, its end-of-turn
    marker and eos are the continuation; a reward model reads its score at the last rendered token)."""
    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.evaluation import tasks as T
    from scaletrain.generation.likelihood import continuation_logprobs, scores_at
    from scaletrain.stages.preference.data import _messages

    renderer = ChatRenderer(tokenizer, template)
    rows = []
    for row in task.rows:
        for side in ("chosen", "rejected"):
            ids, target = renderer.render(_messages(row["prompt"], row[side]))
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

