"""`scaletrain eval`: score a model on local evaluation files, in any tensor / pipeline / data layout.

    scaletrain eval runs/tiny --task perplexity:held_out.jsonl --task choice:mc.jsonl
    torchrun --nproc_per_node 4 -m scaletrain.cli eval runs/big --task answer:data/arith/sft_test.jsonl \\
        --set parallel.tp=2 --set parallel.pp=2 --output results.json

MODEL is a run directory, its checkpoints/ folder, a step_* checkpoint or a Hugging Face directory. The
model is built frozen in the layout the `--set parallel.*` keys give (the world size must be a multiple of
tp·pp; the rest is dp, each replica scoring a share of the rows) and every score comes from the
forward-only schedule (generation/likelihood.py) or the rollout sampler (generation/sampler.py). The chat
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

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.checkpoint.locate import model_files
from scaletrain.config import ConfigError, RunConfig, load_config
from scaletrain.data.tokenizer import Tokenizer, load_tokenizer
from scaletrain.distributed import read_env
from scaletrain.evaluation.runner import EvalOptions, answer_prompts, run_task
from scaletrain.evaluation.tasks import KINDS, Task, add_shots, parse_task
from scaletrain.model_builder import ModelBuilder, check_companion
from scaletrain.runtime import frozen_runtime


def add_args(p: argparse.ArgumentParser) -> None:
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


def options(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, template=args.template,
                       samples=args.samples, refusal_patterns=args.refusal_patterns, chat=args.chat)


def command(args: argparse.Namespace) -> int:
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
        env = read_env()
        p = cfg.parallel
        if env.world_size % (p.tp * p.pp * p.cp):
            raise ConfigError(f"evaluation runs at tp·pp·cp = {p.tp}·{p.pp}·{p.cp} on world size {env.world_size}: "
                              f"launch a multiple of {p.tp * p.pp * p.cp} processes (extra processes are data-parallel "
                              "replicas; evaluation rows are scored whole, the cp ranks taking shares of them)")
        if p.ep > 1:  # the likelihood passes split rows over dp unevenly: not lock-stepped over ep (docs/moe.md)
            raise ConfigError(f"evaluation at parallel.ep = {p.ep}: its passes are not run in lock step over the "
                              "expert-parallel ranks yet; set parallel.ep = 1 (tp and pp still split the model)")
        tokenizer = load_tokenizer(str(tok_dir))
        check_companion(cfg, "model", args.model, role="model", tokenizer_vocab=tokenizer.vocab_size)
        for task in tasks:
            if task.kind in ("answer", "refusal"):
                task.prompts = answer_prompts(task, tokenizer, args.template or template, seq, args.max_new_tokens)
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


def _evaluate(cfg: RunConfig, args: argparse.Namespace, tasks: list[Task], tokenizer: Tokenizer,
              template: str) -> dict | None:
    """Every task's metrics (None on ranks other than 0)."""
    with frozen_runtime(cfg) as rt:
        dims, precision, device = rt.dims, rt.precision, rt.device
        model, line = ModelBuilder(cfg, rt).frozen("model", args.model)
        if dims.is_main:
            print(f"scaletrain eval: {line}; layout tp{dims.tp}·pp{dims.pp}·cp{dims.cp}·dp{dims.dp}; precision {precision.name}; "
                  f"rows of up to {cfg.train.seq_length} tokens", flush=True)
            if args.chat or any(t.kind in ("answer", "refusal", "preference") for t in tasks):
                print(f"chat template: {ChatRenderer(tokenizer, args.template or template).origin}", flush=True)
        out: dict[str, Any] = {}
        for task in tasks:
            t0 = time.perf_counter()
            out[task.name] = {**run_task(task, model, dims, cfg, options(args), tokenizer, template, precision, device),
                              "seconds": round(time.perf_counter() - t0, 3)}
    if not dims.is_main:
        return None
    return {"model": str(args.model), "layout": {"tp": dims.tp, "pp": dims.pp, "cp": dims.cp, "dp": dims.dp},
            "shots": args.shots,
            "chat": args.chat,
            "seq_length": cfg.train.seq_length, "precision": precision.name, "tasks": out}


