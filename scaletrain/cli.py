"""The `scaletrain` command. Dispatch only: every command lives in scaletrain/commands/, and one command per
registered training stage comes from the stage registry (scaletrain/stages/registry.py).

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

from scaletrain.commands.data import EXIT_BAD_INPUT, add_data_commands


def build_parser() -> argparse.ArgumentParser:
    # The commands that load torch, imported here rather than at the top: `scaletrain data` runs without them.
    from scaletrain.commands import chat, convert, eval, generate, profile, rlaif, train

    parser = argparse.ArgumentParser(prog="scaletrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_train_commands(sub)
    add_data_commands(sub)
    convert.add_convert_commands(sub)
    for name, module, help_text in (
            ("chat", chat, "talk to a fine-tuned model (run, checkpoint or HF directory), executing the tools it calls"),
            ("rlaif", rlaif, "preference pairs from AI feedback: the policy's two responses per prompt, judged against "
                             "written principles (for dpo / reward)"),
            ("eval", eval, "score a model on local evaluation files (perplexity, multiple choice, answers) in any "
                           "tp/pp/dp layout"),
            ("generate", generate, "plain-text continuations of raw prompts (no chat template; greedy or sampled, stop "
                                   "strings) in any tp/pp/dp layout → jsonl with token ids"),
            ("profile", profile, "analytic plan (--plan) or a measured run next to it")):
        p = sub.add_parser(name, help=help_text)
        module.add_args(p)
        p.set_defaults(func=module.command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    handled: tuple[type[Exception], ...] = (FileNotFoundError, FileExistsError, KeyError, ValueError)
    if argv[:1] == ["data"]:  # the data tools alone: no torch, no trainer (~0.2 GB less resident memory)
        parser = argparse.ArgumentParser(prog="scaletrain")
        add_data_commands(parser.add_subparsers(dest="command", required=True))
    else:
        parser = build_parser()
        from scaletrain.checkpoint.files import CheckpointError  # (torch: loaded by build_parser already)

        handled = (*handled, CheckpointError)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except handled as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
