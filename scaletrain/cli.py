"""The `scaletrain` command: train, and the data tools.

    scaletrain train --config configs/tiny.toml [--set section.key=value ...]
    scaletrain data tokenizer --input corpus.jsonl.gz --vocab-size 4096 --output data/tokenizer
    scaletrain data curate --input raw.jsonl --output clean.jsonl --decontaminate eval.jsonl
    scaletrain data preprocess --input corpus.jsonl.gz --tokenizer data/tokenizer --output-prefix data/kjv
    scaletrain convert to-hf runs/tiny/checkpoints runs/tiny/hf
    scaletrain convert from-hf path/to/hf_model checkpoints/imported
    scaletrain sft|dpo|reward|grpo|ppo|distill --config run.toml ... (post-training on the same trainer)
    scaletrain chat runs/tools_sft [--message "..."]   (executes the model's tool calls)
    scaletrain rlaif --policy runs/sft --prompts prompts.jsonl --output pairs.jsonl   (AI-labelled pairs)
    scaletrain eval runs/tiny --task perplexity:held_out.jsonl --task choice:mc.jsonl [--set parallel.tp=2]
    scaletrain generate runs/tiny --prompts prompts.jsonl [--temperature 0.8 --seed 1] [--stop TEXT] [--output out.jsonl]
    scaletrain profile --config run.toml --plan | --steps 20
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_BAD_INPUT = 0, 2  # scaletrain.train's; imported lazily so that the data tools never load torch


def _builtin(inputs: list[str]) -> list[str]:
    from scaletrain.data.preprocess import BUILTIN_CORPUS

    return [str(BUILTIN_CORPUS) if i == "builtin:kjv" else i for i in inputs]


def _iter_texts(inputs: list[str], text_key: str):
    from scaletrain.data.inputs import checked_rows
    from scaletrain.data.preprocess import input_format
    from scaletrain.data.rows import iter_rows

    fmt = input_format(inputs, "train a tokenizer on")
    for row in checked_rows(iter_rows(inputs, fmt), inputs, text_key):  # streamed as `data preprocess` reads
        if text_key not in row:
            raise KeyError(f"input rows have no '{text_key}' field (fields: {', '.join(row)}); pass --text-key.")
        yield row[text_key] or ""


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from scaletrain.data.tokenizer import train_sentencepiece

    path = train_sentencepiece(_iter_texts(_builtin(args.input), args.text_key), args.output, args.vocab_size,
                               threads=args.workers or 1)
    print(f"wrote {path} (SentencePiece BPE, {args.vocab_size} tokens, byte fallback)")
    return EXIT_OK


def _cmd_curate(args: argparse.Namespace) -> int:
    from scaletrain.data.curate import curate
    from scaletrain.data.quality import QualityConfig

    dedup = () if args.dedup == "none" else tuple(m.strip() for m in args.dedup.split(",") if m.strip())
    try:
        report = curate(_builtin(args.input), args.output, text_key=args.text_key, quality=args.quality, dedup=dedup,
                        near_threshold=args.near_threshold, decontaminate=tuple(args.decontaminate), ngram=args.ngram,
                        quality_cfg=QualityConfig(min_words=args.min_words))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report.line())
    print(f"wrote {args.output} and {args.output}.report.json")
    return EXIT_OK


def _cmd_synth(args: argparse.Namespace) -> int:
    from scaletrain.data.synth import write_task

    counts = write_task(args.output, args.train, args.test, seed=args.seed, max_number=args.max_number,
                        ops=tuple(o.strip() for o in args.ops.split(",") if o.strip()),
                        tool_max_number=args.tool_max_number)
    print(f"wrote {args.output}: " + ", ".join(f"{k}.jsonl {v} rows" for k, v in counts.items()))
    return EXIT_OK


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from scaletrain.data.preprocess import preprocess, stats_line

    stats = preprocess(_builtin(args.input), args.tokenizer, args.output_prefix, text_key=args.text_key,
                       workers=args.workers, append_eod=not args.no_eod, add_bos=args.add_bos)
    print(stats_line(stats))
    return EXIT_OK


def _cmd_to_hf(args: argparse.Namespace) -> int:
    from scaletrain.checkpoint.hf import export_to_hf

    out = export_to_hf(args.checkpoint, args.out_dir, dtype=args.dtype,
                       max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote Hugging Face model to {out}")
    return EXIT_OK


def _cmd_from_hf(args: argparse.Namespace) -> int:
    from scaletrain.checkpoint.hf import import_from_hf

    out = import_from_hf(args.hf_dir, args.out_checkpoint, dtype=args.dtype)
    print(f"wrote scaletrain checkpoint {out} (loadable at any parallel layout)")
    return EXIT_OK


def _add_data_commands(sub) -> None:
    """`scaletrain data …`: parsed without importing torch or the trainer (their memory and start-up)."""
    data = sub.add_parser("data", help="tokenizers and datasets").add_subparsers(dest="data_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--input", nargs="+", required=True,
                        help="jsonl/json/parquet/txt files (gzip ok); 'builtin:kjv' is the bundled corpus")
    common.add_argument("--text-key", default="text", help="field holding the text (default: text)")
    common.add_argument("--workers", type=int, default=None,
                        help="threads: tokenizer training (default 1), tokenizing in preprocess (default: every core)")
    tok = data.add_parser("tokenizer", parents=[common], help="train a SentencePiece BPE tokenizer")
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--output", required=True, help="output folder (tokenizer.model + transformers config)")
    tok.set_defaults(func=_cmd_tokenizer)
    pre = data.add_parser("preprocess", parents=[common], help="tokenize into Megatron .bin/.idx")
    pre.add_argument("--tokenizer", required=True, help="folder or file: tokenizer.model / tokenizer.json")
    pre.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    pre.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    pre.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS to each document")
    pre.set_defaults(func=_cmd_preprocess)
    cur = data.add_parser("curate", help="quality filters, exact and near-duplicate removal, decontamination → jsonl")
    cur.add_argument("--input", nargs="+", required=True, help="jsonl/json/parquet files (gzip ok)")
    cur.add_argument("--output", required=True, help="kept rows (jsonl); OUTPUT.report.json gets the counts")
    cur.add_argument("--text-key", default="text", help="field holding the text (default: text)")
    cur.add_argument("--quality", default="gopher", choices=("gopher", "none"), help="heuristic filters (default gopher)")
    cur.add_argument("--min-words", type=int, default=50, help="quality: fewest words a document may have (default 50)")
    cur.add_argument("--dedup", default="exact,near", help="exact, near, both (default) comma-separated, or none")
    cur.add_argument("--near-threshold", type=float, default=0.8, help="MinHash Jaccard threshold (default 0.8)")
    cur.add_argument("--decontaminate", nargs="*", default=[], metavar="EVAL_FILE",
                     help="evaluation files whose n-grams must not appear in training documents")
    cur.add_argument("--ngram", type=int, default=13, help="decontamination n-gram size in words (default 13)")
    cur.set_defaults(func=_cmd_curate)
    synth = data.add_parser("synth", help="write the synthetic arithmetic task (pretrain / SFT / DPO forms)")
    synth.add_argument("--output", required=True, help="output folder")
    synth.add_argument("--train", type=int, default=5000, help="training problems (default 5000)")
    synth.add_argument("--test", type=int, default=500, help="held-out problems (default 500)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--max-number", type=int, default=20, help="largest first operand (default 20)")
    synth.add_argument("--ops", default="add,sub,mul", help="comma-separated: add, sub, mul (default all)")
    synth.add_argument("--tool-max-number", type=int, default=99,
                       help="largest operand of the tool-use form, tools_{train,test}.jsonl (default 99)")
    synth.set_defaults(func=_cmd_synth)


def build_parser() -> argparse.ArgumentParser:
    from scaletrain.build import add_train_args, train_command

    parser = argparse.ArgumentParser(prog="scaletrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="pretrain from a run file")
    add_train_args(train)
    train.set_defaults(func=train_command)
    sft = sub.add_parser("sft", help="supervised fine-tuning on chat data ([posttrain] section; = train with "
                                     "posttrain.objective=sft)")
    add_train_args(sft)
    sft.set_defaults(func=lambda a: train_command(a, objective="sft"))
    dpo = sub.add_parser("dpo", help="preference optimisation (DPO, IPO, hinge, SimPO) on prompt/chosen/rejected "
                                     "rows ([posttrain] section; = train with posttrain.objective=dpo)")
    add_train_args(dpo)
    dpo.set_defaults(func=lambda a: train_command(a, objective="dpo"))
    reward = sub.add_parser("reward", help="train a reward model (Bradley–Terry, score head) on prompt/chosen/rejected "
                                           "rows ([posttrain] section; = train with posttrain.objective=reward)")
    add_train_args(reward)
    reward.set_defaults(func=lambda a: train_command(a, objective="reward"))
    grpo = sub.add_parser("grpo", help="RL on verifiable rewards (GRPO: sampled groups, group-relative advantages; "
                                       "[posttrain] section; = train with posttrain.objective=grpo)")
    add_train_args(grpo)
    grpo.set_defaults(func=lambda a: train_command(a, objective="grpo"))
    ppo = sub.add_parser("ppo", help="RLHF with PPO: a learned critic, per-token KL-penalised rewards, GAE and the "
                                     "clipped surrogate (= train with posttrain.objective=ppo)")
    add_train_args(ppo)
    ppo.set_defaults(func=lambda a: train_command(a, objective="ppo"))
    distill = sub.add_parser("distill", help="knowledge distillation: match posttrain.teacher's next-token "
                                             "distributions (KL, vocab-parallel) on pretraining data or chat rows "
                                             "(= train with posttrain.objective=distill)")
    add_train_args(distill)
    distill.set_defaults(func=lambda a: train_command(a, objective="distill"))

    _add_data_commands(sub)

    conv = sub.add_parser("convert", help="Hugging Face checkpoint conversion").add_subparsers(
        dest="convert_command", required=True)
    to_hf = conv.add_parser("to-hf", help="scaletrain checkpoint (any layout) → Hugging Face directory")
    to_hf.add_argument("checkpoint", help="a step_* checkpoint directory, or a run's checkpoints/ (its latest)")
    to_hf.add_argument("out_dir")
    to_hf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5 GB)")
    to_hf.set_defaults(func=_cmd_to_hf)
    from_hf = conv.add_parser("from-hf", help="Hugging Face directory → scaletrain checkpoint")
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("out_checkpoint")
    from_hf.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    from_hf.set_defaults(func=_cmd_from_hf)
    chat = sub.add_parser("chat", help="talk to a fine-tuned model (run, checkpoint or HF directory), executing "
                                       "the tools it calls")
    from scaletrain.commands.chat import add_chat_args, chat_command

    add_chat_args(chat)
    chat.set_defaults(func=chat_command)
    fb = sub.add_parser("rlaif", help="preference pairs from AI feedback: the policy's two responses per prompt, "
                                      "judged against written principles (for dpo / reward)")
    from scaletrain.commands.rlaif import add_rlaif_args, rlaif_command

    add_rlaif_args(fb)
    fb.set_defaults(func=rlaif_command)
    ev = sub.add_parser("eval", help="score a model on local evaluation files (perplexity, multiple choice, "
                                     "answers) in any tp/pp/dp layout")
    from scaletrain.commands.eval import add_eval_args, eval_command

    add_eval_args(ev)
    ev.set_defaults(func=eval_command)
    gen = sub.add_parser("generate", help="plain-text continuations of raw prompts (no chat template; greedy or "
                                          "sampled, stop strings) in any tp/pp/dp layout → jsonl with token ids")
    from scaletrain.commands.generate import add_generate_args, generate_command

    add_generate_args(gen)
    gen.set_defaults(func=generate_command)
    prof = sub.add_parser("profile", help="analytic plan (--plan) or a measured run next to it")
    from scaletrain.commands.profile import add_profile_args, profile_command

    add_profile_args(prof)
    prof.set_defaults(func=profile_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    handled: tuple[type[Exception], ...] = (FileNotFoundError, FileExistsError, KeyError, ValueError)
    if argv[:1] == ["data"]:  # the data tools alone: no torch, no trainer (~0.2 GB less resident memory)
        parser = argparse.ArgumentParser(prog="scaletrain")
        _add_data_commands(parser.add_subparsers(dest="command", required=True))
    else:
        from scaletrain.checkpoint.io import CheckpointError

        parser, handled = build_parser(), (*handled, CheckpointError)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except handled as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
