"""`scaletrain convert to-hf | from-hf`: checkpoints of any layout ↔ Hugging Face directories."""

from __future__ import annotations

import argparse

from scaletrain.checkpoint.hf import import_from_hf
from scaletrain.export import export_to_hf

EXIT_OK = 0


def _cmd_to_hf(args: argparse.Namespace) -> int:
    out = export_to_hf(args.checkpoint, args.out_dir, dtype=args.dtype,
                       max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote Hugging Face model to {out}")
    return EXIT_OK


def _cmd_from_hf(args: argparse.Namespace) -> int:
    out = import_from_hf(args.hf_dir, args.out_checkpoint, dtype=args.dtype)
    print(f"wrote scaletrain checkpoint {out} (loadable at any parallel layout)")
    return EXIT_OK


def add_convert_commands(sub: argparse._SubParsersAction) -> None:
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
