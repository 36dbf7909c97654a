"""What the example scripts share: the repository root and running one real `scaletrain` command."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    """`scaletrain ARGS…` from the repository root, echoed; a failing stage stops the example."""
    print("+ scaletrain", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "scaletrain.cli", *args], cwd=REPO, check=True)


def prepare_kjv() -> tuple[Path, Path]:
    """The bundled corpus as the README's main job prepares it (skipped where present): data/tokenizer (2,048
    tokens) and data/kjv_text_document.bin/.idx. Returns (tokenizer dir, dataset prefix)."""
    tok, prefix = REPO / "data" / "tokenizer", REPO / "data" / "kjv_text_document"
    if not (tok / "tokenizer.model").exists():
        run("data", "tokenizer", "--input", "builtin:kjv", "--vocab-size", "2048", "--output", str(tok))
    if not prefix.with_suffix(".idx").exists():
        run("data", "preprocess", "--input", "builtin:kjv", "--tokenizer", str(tok), "--output-prefix", str(prefix),
            "--workers", "2")
    return tok, prefix


def prepare_arith_task(work: Path, n_eval: int, max_number: int, ops: str) -> tuple[Path, Path]:
    """The synthetic arithmetic task under `work` (skipped where present): data/ (4000 training problems in
    every form, `n_eval` held out), a 384-token tokenizer and the pretraining .bin/.idx. Returns (data, tokenizer)."""
    data, tok = work / "data", work / "tokenizer"
    if not (data / "pretrain.jsonl").exists():
        run("data", "synth", "--output", str(data), "--train", "4000", "--test", str(n_eval),
            "--max-number", str(max_number), "--ops", ops)
    if not (tok / "tokenizer.model").exists():
        run("data", "tokenizer", "--input", str(data / "pretrain.jsonl"), "--vocab-size", "384", "--output", str(tok))
    if not (work / "pretrain_text_document.idx").exists():
        run("data", "preprocess", "--input", str(data / "pretrain.jsonl"), "--tokenizer", str(tok),
            "--output-prefix", str(work / "pretrain_text_document"))
    return data, tok


def pretrain_and_sft(work: Path, data: Path, tok: Path, common: list[str], pretrain_steps: int, sft_steps: int,
                     prefix: str = "") -> str:
    """The task's base policy: pretrain on its text form (exported to work/PREFIXpretrain/hf), then SFT on its
    chat form from that export (exported to work/SFT_DIR/hf). Finished stages are skipped on a re-run. Returns
    SFT_DIR (PREFIXsft-sN). `prefix` keeps two models' runs apart in one work folder (a teacher and its student)."""
    pretrain = work / f"{prefix}pretrain"
    run("train", *common, "--set", f'data.prefixes=["{work / "pretrain_text_document"}"]',
        "--set", f"train.run_dir={pretrain}", "--set", f"train.steps={pretrain_steps}",
        "--set", "checkpoint.export_hf=hf")
    sft_dir = f"{prefix}sft-s{sft_steps}"
    run("sft", *common, "--set", f"checkpoint.init_from_hf={pretrain / 'hf'}",
        "--set", f'posttrain.chat.train_data=["{data / "sft_train.jsonl"}"]', "--set", f"train.run_dir={work / sft_dir}",
        "--set", f"train.steps={sft_steps}", "--set", "optim.lr=1e-3", "--set", "optim.warmup_steps=5",
        "--set", "checkpoint.export_hf=hf")
    return sft_dir


def task_parser(work: str) -> argparse.ArgumentParser:
    """The arguments every arithmetic-task example takes: work folder, stage lengths, task, evaluation size."""
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=work)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--eval", type=int, default=200, help="held-out problems to evaluate")
    p.add_argument("--max-number", type=int, default=9, help="task difficulty: largest first operand")
    p.add_argument("--ops", default="add,sub", help="task operations (add, sub, mul)")
    return p


def print_accuracies(work: Path, tok: Path, args: argparse.Namespace, stages: list[tuple[str, str]]) -> None:
    """Held-out exact match (greedy) and sampled accuracy (T = 1, 8 per problem) of each (name, run dir)."""
    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.checkpoint import latest_checkpoint
    from scaletrain.checkpoint.hf import load_full_model
    from scaletrain.data.synth import problems
    from scaletrain.data.tokenizer import load_tokenizer
    from scaletrain.evaluation.synthetic import sampled_accuracy

    renderer = ChatRenderer(load_tokenizer(str(tok)), "chatml")
    held_out = problems(args.eval, seed=0, split="test", max_number=args.max_number, ops=tuple(args.ops.split(",")))
    rows = {}
    for name, run_dir in stages:
        _, model = load_full_model(latest_checkpoint(work / run_dir / "checkpoints"))
        rows[name] = (sampled_accuracy(model, renderer, held_out, temperature=0.0),
                      sampled_accuracy(model, renderer, held_out, samples=8))
    print(f"\nheld-out: {len(held_out)} problems (chat prompt), scored by the answer checker")
    width = max(11, *(len(name) for name in rows))
    print(f"  {'model':<{width}} {'exact match (greedy)':>20} {'sampled accuracy (T=1, 8 per problem)':>38}")
    for name, (em, acc) in rows.items():
        print(f"  {name:<{width}} {100 * em:19.1f}% {100 * acc:37.1f}%")


def add_grpo_args(p: argparse.ArgumentParser, kl_beta: float) -> None:
    p.add_argument("--grpo-steps", type=int, default=200)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--grpo-lr", type=float, default=1e-4)
    p.add_argument("--kl-beta", type=float, default=kl_beta)
    p.add_argument("--grpo-seed", type=int, default=None, help="GRPO's train.seed (prompt order, sampling; "
                                                                "default: the config's)")


def run_grpo(work: Path, data: Path, common: list[str], args: argparse.Namespace, start: str, prefix: str,
             *extra: str, suffix: str = "") -> str:
    """GRPO from work/START/hf on the task's prompts (`extra`: more --set pairs, e.g. the rewards; `suffix`
    names such a variant's run dir); returns its run dir."""
    grpo_dir = (f"{prefix}-grpo-s{args.grpo_steps}-g{args.group_size}-p{args.prompts_per_step}-lr{args.grpo_lr:g}"
                f"-kl{args.kl_beta:g}{'' if args.grpo_seed is None else f'-seed{args.grpo_seed}'}{suffix}")
    completions = args.group_size * args.prompts_per_step
    run("grpo", *common, "--set", f"checkpoint.init_from_hf={work / start / 'hf'}",
        "--set", f'posttrain.chat.train_data=["{data / "sft_train.jsonl"}"]', "--set", f"train.run_dir={work / grpo_dir}",
        "--set", f"train.steps={args.grpo_steps}", "--set", f"optim.lr={args.grpo_lr}", "--set", "optim.warmup_steps=5",
        "--set", f"optim.min_lr={args.grpo_lr}", "--set", "optim.weight_decay=0.0",
        "--set", f"train.global_batch_size={completions}", "--set", f"train.micro_batch_size={min(completions, 32)}",
        "--set", f"posttrain.grpo.group_size={args.group_size}", "--set", "posttrain.rollout.max_new_tokens=20",
        "--set", f"posttrain.grpo.beta={args.kl_beta}",
        *(() if args.grpo_seed is None else ("--set", f"train.seed={args.grpo_seed}")), *extra)
    return grpo_dir
