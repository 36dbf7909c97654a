"""`scaletrain data …`: tokenizer training, Megatron .bin/.idx preprocessing, curation, the synthetic task.

Imports neither torch nor the trainer (their memory and start-up): `scaletrain data` parses and runs with
this module alone (cli.py).
"""

from __future__ import annotations

import argparse
import sys

from scaletrain.data.curate import curate
from scaletrain.data.inputs import checked_rows
from scaletrain.data.preprocess import BUILTIN_CORPUS, input_format, preprocess, stats_line
from scaletrain.data.quality import QualityConfig
from scaletrain.data.rows import iter_rows
from scaletrain.data.synth import write_task
from scaletrain.data.tokenizer import train_sentencepiece

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _builtin(inputs: list[str]) -> list[str]:
    return [str(BUILTIN_CORPUS) if i == "builtin:kjv" else i for i in inputs]


def _iter_texts(inputs: list[str], text_key: str):
    fmt = input_format(inputs, "train a tokenizer on")
    for row in checked_rows(iter_rows(inputs, fmt), inputs, text_key):  # streamed as `data preprocess` reads
        if text_key not in row:
            raise KeyError(f"input rows have no '{text_key}' field (fields: {', '.join(row)}); pass --text-key.")
        yield row[text_key] or ""


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    path = train_sentencepiece(_iter_texts(_builtin(args.input), args.text_key), args.output, args.vocab_size,
                               threads=args.workers or 1)
    print(f"wrote {path} (SentencePiece BPE, {args.vocab_size} tokens, byte fallback)")
    return EXIT_OK


def _cmd_curate(args: argparse.Namespace) -> int:
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
    counts = write_task(args.output, args.train, args.test, seed=args.seed, max_number=args.max_number,
                        ops=tuple(o.strip() for o in args.ops.split(",") if o.strip()),
                        tool_max_number=args.tool_max_number)
    print(f"wrote {args.output}: " + ", ".join(f"{k}.jsonl {v} rows" for k, v in counts.items()))
    return EXIT_OK


def _cmd_preprocess(args: argparse.Namespace) -> int:
    stats = preprocess(_builtin(args.input), args.tokenizer, args.output_prefix, text_key=args.text_key,
                       workers=args.workers, append_eod=not args.no_eod, add_bos=args.add_bos)
    print(stats_line(stats))
    return EXIT_OK


def add_data_commands(sub: argparse._SubParsersAction) -> None:
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
