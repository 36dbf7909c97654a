"""`scaletrain generate`: plain-text continuations of raw prompts — no chat template — in any tp/pp/dp layout.

    scaletrain generate runs/tiny --prompts prompts.jsonl --max-new-tokens 64 --output out.jsonl
    torchrun --nproc_per_node 4 -m scaletrain.cli generate path/to/hf_model --prompts prompts.txt \\
        --set parallel.tp=2 --set parallel.pp=2 --temperature 0.8 --seed 7 --stop "\\n\\n"

MODEL is what `scaletrain eval` takes (a run directory, its checkpoints/ folder, a step_* checkpoint or a
Hugging Face directory), built frozen in the layout of the `--set parallel.*` keys, launched the same way.
Prompts: a .jsonl file (a `prompt` or `text` string per row) or a .txt file (one prompt per line), each
tokenised as it is (`--add-bos` puts the tokenizer's bos first). Continuations are greedy (default) or
sampled at --temperature with one generator per prompt seeded from --seed and the prompt's index, so
they depend neither on the layout nor on the batch. Decoding is the rollout engine's (generation/sampler.py:
a KV cache per microbatch on the torch backend), the prompts split over dp replicas in batches of
--batch-size. Only the tokenizer's tokens are candidates (padding rows of the embedding never are).

A completion stops at eos — for a Hugging Face model, at every id of its generation_config.json
`eos_token_id`, where transformers' generate() stops — at a --stop string, or after --max-new-tokens.
Rank 0 writes one jsonl row per prompt (to --output, else stdout): index, prompt, prompt_ids, completion
(the text before the stop string; eos not spelled out), completion_ids (every generated token, the one
that stopped included), finish_reason (eos | stop | length) and the stop string that matched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from scaletrain.checkpoint.locate import locate_model, model_files
from scaletrain.config import ConfigError, RunConfig, load_config
from scaletrain.data.tokenizer import Tokenizer, load_tokenizer
from scaletrain.distributed import read_env
from scaletrain.generation.sampler import sample_share
from scaletrain.model_builder import ModelBuilder, check_companion
from scaletrain.runtime import frozen_runtime


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory, its checkpoints/ folder, a step_* checkpoint or a Hugging Face "
                                 "model directory")
    p.add_argument("--prompts", required=True, help=".jsonl (`prompt` or `text` per row) or .txt (one per line)")
    p.add_argument("--output", default=None, help="write the jsonl rows here (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest continuation (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample at it")
    p.add_argument("--seed", type=int, default=0, help="sampling: prompt i draws from a generator seeded by (seed, i)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop once the continuation contains TEXT (repeatable; not part of the returned text)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward (micro batch)")
    p.add_argument("--add-bos", action="store_true", help="put the tokenizer's bos token before each prompt")
    p.add_argument("--config", default=None, help="a run file whose [parallel] / [precision] sections apply")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="e.g. --set parallel.tp=2 --set precision.dtype=float64")


def read_prompts(path: str) -> list[str]:
    """The prompts of a .txt (one per line) or .jsonl (`prompt` or `text`) file, checked."""
    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"--prompts {f} does not exist")
    if f.suffix == ".txt":
        prompts = f.read_text(encoding="utf-8").splitlines()
    else:
        prompts = []
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--prompts {f}: line {i + 1} is not JSON ({e})") from None
            text = next((row[k] for k in ("prompt", "text") if isinstance(row, dict) and isinstance(row.get(k), str)),
                        None)
            if text is None:
                raise ValueError(f"--prompts {f}: line {i + 1} has no `prompt` (or `text`) string")
            prompts.append(text)
    if not prompts:
        raise ValueError(f"--prompts {f} holds no prompts")
    return prompts


def eos_ids(tokenizer, kind: str, where: Path) -> set[int]:
    """Where generation ends: the tokenizer's eos, and a Hugging Face model's generation_config.json eos ids."""
    ids = {tokenizer.eos_id}
    gen = where / "generation_config.json"
    if kind == "hf" and gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(value if isinstance(value, list) else [] if value is None else [value])
    return ids


def command(args: argparse.Namespace) -> int:
    try:
        texts = read_prompts(args.prompts)
        if args.max_new_tokens < 1 or args.temperature < 0 or args.batch_size < 1:
            raise ValueError("--max-new-tokens and --batch-size must be at least 1, --temperature at least 0")
        kind, m, tok_dir, _ = model_files(args.model)
        if m.num_labels:
            raise ConfigError(f"{args.model} is a reward model (a score head): it has no token probabilities to "
                              "generate with")
        tokenizer = load_tokenizer(str(tok_dir))
        if args.add_bos and tokenizer.bos_id is None:
            raise ValueError(f"--add-bos: the tokenizer in {tok_dir} has no bos token")
        bos: list[int] = [tokenizer.bos_id] if args.add_bos and tokenizer.bos_id is not None else []
        prompts = [bos + tokenizer.encode(t) for t in texts]
        empty = [i for i, p in enumerate(prompts) if not p]
        if empty:
            raise ValueError(f"prompt(s) {', '.join(map(str, empty[:8]))} have no tokens; give them text or --add-bos")
        seq = max(len(p) for p in prompts) + args.max_new_tokens
        if m.max_position_embeddings and seq > m.max_position_embeddings:
            raise ValueError(f"the longest prompt ({seq - args.max_new_tokens} tokens) + --max-new-tokens "
                             f"{args.max_new_tokens} exceed the model's {m.max_position_embeddings} positions; "
                             "shorten it or lower --max-new-tokens")
        cfg = load_config(args.config, [*args.overrides, f"train.seq_length={seq}"])
        cfg = dataclasses.replace(cfg, model=m)
        p, world = cfg.parallel, read_env().world_size
        if world % (p.tp * p.pp * p.cp):
            raise ConfigError(f"generation runs at tp·pp·cp = {p.tp}·{p.pp}·{p.cp} on world size {world}: launch a "
                              f"multiple of {p.tp * p.pp * p.cp} processes (the rest are data-parallel replicas)")
        check_companion(cfg, "model", args.model, role="model", tokenizer_vocab=tokenizer.vocab_size)
        stop_ids = eos_ids(tokenizer, kind, locate_model("model", args.model)[1])
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        return 2
    rows = _generate(cfg, args, texts, prompts, tokenizer, stop_ids)
    if rows is not None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if args.output:
            Path(args.output).write_text(lines, encoding="utf-8")
            print(f"wrote {len(rows)} completions to {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(lines)
    return 0


def _generate(cfg: RunConfig, args: argparse.Namespace, texts: list[str], prompts: list[list[int]],
              tokenizer: Tokenizer, stop_ids: set[int]) -> list[dict] | None:
    """The output rows (None on ranks other than 0); collective over the world."""
    with frozen_runtime(cfg) as rt:
        dims, precision, device = rt.dims, rt.precision, rt.device
        model, line = ModelBuilder(cfg, rt).frozen("model", args.model)
        if dims.is_main:
            print(f"scaletrain generate: {line}; layout tp{dims.tp}·pp{dims.pp}·cp{dims.cp}·dp{dims.dp}; precision "
                  f"{precision.name}; {len(prompts)} prompts, " + (f"sampled at temperature {args.temperature} "
                  f"(seed {args.seed})" if args.temperature > 0 else "greedy"), file=sys.stderr, flush=True)
        completions, _ = sample_share(
            model, dims, prompts, seed=args.seed if args.temperature > 0 else None, group_size=1,
            micro_batch=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            stop_ids=stop_ids, stop_text=tuple(args.stop) or None, decode=tokenizer.decode,
            pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
            vocab_limit=tokenizer.vocab_size, precision=precision, device=device,
            width_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
    if not dims.is_main:
        return None
    return [{"index": i, "prompt": text, "prompt_ids": prompt, **_finish(ids, tokenizer, stop_ids, args.stop)}
            for i, (text, prompt, ids) in enumerate(zip(texts, prompts, completions))]


def _finish(ids: list[int], tokenizer: Tokenizer, stop_ids: set[int], stops: list[str]) -> dict[str, Any]:
    """completion text (before the first stop string; eos not spelled out), ids, finish_reason, stop."""
    if ids and ids[-1] in stop_ids:
        return {"completion": tokenizer.decode(ids[:-1]), "completion_ids": ids, "finish_reason": "eos", "stop": None}
    text = tokenizer.decode(ids)
    hits = [(text.find(s), s) for s in stops if s in text]
    if hits:
        at, stop = min(hits)
        return {"completion": text[:at], "completion_ids": ids, "finish_reason": "stop", "stop": stop}
    return {"completion": text, "completion_ids": ids, "finish_reason": "length", "stop": None}
