"""`scaletrain rlaif`: preference pairs from AI feedback against written principles (stages/preference/rlaif.py).

    scaletrain rlaif --policy runs/sft --prompts data/arith/sft_train.jsonl --output data/ai_pairs.jsonl
    torchrun --nproc_per_node 4 -m scaletrain.cli rlaif --policy runs/sft/hf --judge runs/big/hf \\
        --principles my_principles.txt --prompts prompts.jsonl --output pairs.jsonl --set parallel.tp=2

The output rows (`prompt` as messages, `chosen`, `rejected`, plus `principle` and the judge's
`preference` for the chosen response) are what `scaletrain dpo` and `scaletrain reward` read as
posttrain.chat.train_data; OUTPUT.report.json counts the pairs and the drops. Models: run directories,
checkpoints or HF directories; the judge defaults to the policy (self-feedback) and may use its own
tokenizer. Both run frozen in the layout the `--set parallel.*` keys give; rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from scaletrain.chat.renderer import BadConversation, ChatRenderer
from scaletrain.chat.rows import prompt_messages
from scaletrain.checkpoint.locate import model_files
from scaletrain.config import ConfigError, load_config
from scaletrain.data.preprocess import BUILTIN_CORPUS
from scaletrain.data.tokenizer import load_tokenizer
from scaletrain.distributed import read_env
from scaletrain.generation.likelihood import continuation_logprobs
from scaletrain.generation.sampler import completion_text, sample_share, stop_ids_for
from scaletrain.model_builder import ModelBuilder, check_companion
from scaletrain.runtime import frozen_runtime
from scaletrain.stages.preference.rlaif import (
    JUDGE_TEMPLATE,
    FeedbackReport,
    conversation_text,
    judge_rows,
    pick_principles,
    preferences,
    read_principles,
)
from scaletrain.stages.rl.prompts import read_prompt_rows

PRINCIPLES = BUILTIN_CORPUS.parent / "principles.txt"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="the model whose responses are compared (run, checkpoint or HF dir)")
    p.add_argument("--judge", default=None, help="the model that labels them (default: the policy itself)")
    p.add_argument("--prompts", required=True, nargs="+", help="jsonl/parquet rows with `messages` or `prompt`")
    p.add_argument("--principles", default=str(PRINCIPLES), help="one principle per line (default: the bundled set)")
    p.add_argument("--judge-template", default=None,
                   help="a file with the judge's prompt: a Python format string with {conversation}, {principle}, "
                        "{first}, {second}, ending where the option letter follows (default: stages/preference/rlaif.py's)")
    p.add_argument("--output", required=True, help="the preference pairs (jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the two responses")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="drop pairs whose preference is within this of ½ (the judge cannot separate them)")
    p.add_argument("--seq-length", type=int, default=0, help="longest policy row / judge prompt (default: each "
                                                             "model's max_position_embeddings, else 2048)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling and principle-draw seed")
    p.add_argument("--config", default=None, help="a run file whose [parallel] / [precision] sections apply")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")


def command(args: argparse.Namespace) -> int:
    try:
        if args.max_new_tokens < 1 or args.temperature <= 0:
            raise ValueError("--max-new-tokens must be ≥ 1 and --temperature > 0 (two greedy responses are one)")
        principles = read_principles(args.principles)
        template_text = JUDGE_TEMPLATE if args.judge_template is None else Path(args.judge_template).read_text()
        try:
            template_text.format(conversation="", principle="", first="", second="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"--judge-template {args.judge_template}: {e!r}; it may name only {{conversation}}, "
                             "{principle}, {first} and {second}") from None
        args.judge_template_text = template_text
        rows = read_prompt_rows(args.prompts)[: args.limit or None]
        judge_path = args.judge or args.policy
        _, pm, p_tok_dir, template = model_files(args.policy)
        _, jm, j_tok_dir, _ = model_files(judge_path)
        for path, m in ((args.policy, pm), (judge_path, jm)):
            if m.num_labels:
                raise ConfigError(f"{path} is a reward model (a score head): it can neither write responses nor "
                                  "judge them by letter; use a causal LM")
        seq = args.seq_length or min(pm.max_position_embeddings or 2048, jm.max_position_embeddings or 2048)
        cfg = load_config(args.config, [*args.overrides, f"train.seq_length={seq}"])
        env = read_env()
        p = cfg.parallel
        if env.world_size % (p.tp * p.pp * p.cp):
            raise ConfigError(f"rlaif runs at tp·pp·cp = {p.tp}·{p.pp}·{p.cp} on world size {env.world_size}: launch a "
                              f"multiple of {p.tp * p.pp * p.cp} processes (extra processes are data-parallel replicas; "
                              "responses are sampled and judged whole, the cp ranks taking shares of them)")
        p_tok, j_tok = load_tokenizer(str(p_tok_dir)), load_tokenizer(str(j_tok_dir))
        for path, m, tok in ((args.policy, pm, p_tok), (judge_path, jm, j_tok)):
            check_companion(dataclasses.replace(cfg, model=m), "model", path, role="model",
                               tokenizer_vocab=tok.vocab_size)
        renderer = ChatRenderer(p_tok, template)
        prompts, kept = [], []
        for i, row in enumerate(rows):
            try:
                messages = prompt_messages(row)
            except BadConversation as e:
                raise ValueError(f"{args.prompts[0]}: row {i}: {e}") from None
            ids = renderer.prompt_ids(messages)
            if len(ids) + args.max_new_tokens <= seq + 1:
                prompts.append(ids)
                kept.append(messages)
        if not prompts:
            raise ValueError(f"no prompt leaves room for --max-new-tokens {args.max_new_tokens} in {seq} tokens")
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        return 2
    return _label(cfg, args, principles, kept, prompts, len(rows) - len(prompts), renderer, p_tok, j_tok, judge_path)


def _label(cfg, args, principles, messages, prompts, too_long, renderer, p_tok, j_tok, judge_path) -> int:
    report = FeedbackReport(prompts=len(prompts) + too_long)
    if too_long:
        report.dropped["prompt leaves no room for --max-new-tokens"] = too_long
    with frozen_runtime(cfg) as rt:
        dims, precision, device = rt.dims, rt.precision, rt.device
        models = ModelBuilder(cfg, rt)
        policy, line = models.frozen("policy", args.policy)
        judge = policy
        if args.judge and Path(args.judge).resolve() != Path(args.policy).resolve():
            judge, jline = models.frozen("judge", args.judge)
        if dims.is_main:
            print(f"scaletrain rlaif: policy {line}" + (f"; judge {jline}" if judge is not policy else "; judge = policy")
                  + f"; layout tp{dims.tp}·pp{dims.pp}·dp{dims.dp}", flush=True)
        width = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
        marker = renderer.end_of_turn()
        stop_ids = stop_ids_for(p_tok, marker)
        pad = p_tok.pad_id if p_tok.pad_id is not None else p_tok.eos_id
        # Each dp replica samples its share of the prompts (a generator per prompt: the same responses at
        # every layout), then every rank gathers all of them.
        completions, _ = sample_share(
            policy, dims, prompts, seed=args.seed, group_size=2, micro_batch=args.batch_size,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, stop_ids=stop_ids, stop_text=marker,
            decode=p_tok.decode, pad_id=pad, vocab_limit=p_tok.vocab_size, precision=precision, device=device,
            width_multiple=width)
        texts = [(i, completion_text(completions[2 * i], p_tok.decode, stop_ids, marker).strip(),
                  completion_text(completions[2 * i + 1], p_tok.decode, stop_ids, marker).strip())
                 for i in range(len(prompts))]
        chosen_principles = pick_principles(principles, len(prompts), args.seed)
        pairs, rows = [], []
        for i, a, b in texts:
            if a == b:
                report.dropped["identical responses"] += 1
                continue
            r = judge_rows(j_tok, conversation_text(messages[i]), chosen_principles[i], a, b,
                           template=args.judge_template_text)
            if max(len(ids) for ids, _ in r) > cfg.train.seq_length + 1:
                report.dropped["judge prompt longer than --seq-length"] += 1
                continue
            pairs.append((i, a, b))
            rows += r
        logps, _ = continuation_logprobs(judge, dims, rows, micro_batch=args.batch_size, precision=precision,
                                         device=device, pad_id=j_tok.pad_id if j_tok.pad_id is not None
                                         else j_tok.eos_id, width_multiple=width) if rows else \
            (torch.zeros(0, dtype=torch.float64), None)
    if not dims.is_main:
        return 0
    p_first, p_a = preferences(logps) if pairs else (torch.zeros(0), torch.zeros(0))
    report.position_bias = float(p_a.mean()) if pairs else 0.5
    out = []
    for (i, a, b), p in zip(pairs, p_first.tolist()):
        if abs(p - 0.5) < args.min_confidence:
            report.dropped["judge unsure (--min-confidence)"] += 1
            continue
        chosen, rejected, pref = (a, b, p) if p >= 0.5 else (b, a, 1 - p)
        out.append({"prompt": messages[i], "chosen": chosen, "rejected": rejected,
                    "principle": chosen_principles[i], "preference": pref})
    report.pairs = len(out)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        for row in out:
            f.write(json.dumps(row) + "\n")
    Path(f"{args.output}.report.json").write_text(json.dumps(
        {"prompts": report.prompts, "pairs": report.pairs, "dropped": dict(report.dropped),
         "position_bias": report.position_bias, "principles": args.principles, "policy": str(args.policy),
         "judge": str(judge_path)}, indent=2))
    print(report.line())
    print(f"wrote {args.output} and {args.output}.report.json")
    return 0
