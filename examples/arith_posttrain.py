"""Post-training on CPU, end to end, on the synthetic arithmetic task: pretrain a tiny model on the task's
text form, export it to Hugging Face format, fine-tune it (SFT) on the chat form from that export, and
print held-out exact-match accuracy before and after SFT. Every step is the real CLI.

    python examples/arith_posttrain.py [--work runs/arith] [--pretrain-steps 300] [--sft-steps 200]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    print("+ scaletrain", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "scaletrain.cli", *args], cwd=REPO, check=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="runs/arith")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--eval", type=int, default=200, help="held-out problems to evaluate")
    args = p.parse_args()
    w = (REPO / args.work).resolve()
    data, tok = w / "data", w / "tokenizer"
    if not (data / "pretrain.jsonl").exists():
        run("data", "synth", "--output", str(data), "--train", "4000", "--test", str(args.eval))
    if not (tok / "tokenizer.model").exists():
        run("data", "tokenizer", "--input", str(data / "pretrain.jsonl"), "--vocab-size", "384", "--output", str(tok))
    if not (w / "pretrain_text_document.idx").exists():
        run("data", "preprocess", "--input", str(data / "pretrain.jsonl"), "--tokenizer", str(tok),
            "--output-prefix", str(w / "pretrain_text_document"))
    common = ["--config", "configs/tiny.toml", "--set", f"data.tokenizer={tok}", "--set", "train.eval_interval=0",
              "--set", "logging.interval=50", "--set", "logging.tensorboard=false"]
    run("train", *common, "--set", f'data.prefixes=["{w / "pretrain_text_document"}"]',
        "--set", f"train.run_dir={w / 'pretrain'}", "--set", f"train.steps={args.pretrain_steps}")
    run("convert", "to-hf", str(w / "pretrain" / "checkpoints"), str(w / "pretrain_hf"))
    run("sft", *common, "--set", f"checkpoint.init_from_hf={w / 'pretrain_hf'}",
        "--set", f'posttrain.train_data=["{data / "sft_train.jsonl"}"]', "--set", f"train.run_dir={w / 'sft'}",
        "--set", f"train.steps={args.sft_steps}", "--set", "optim.lr=1e-3", "--set", "optim.warmup_steps=10")

    from scaletrain.checkpoint import latest_checkpoint
    from scaletrain.checkpoint.hf import load_full_model
    from scaletrain.data.synth import problems
    from scaletrain.data.tokenizer import load_tokenizer
    from scaletrain.posttrain.chat import ChatRenderer
    from scaletrain.posttrain.evaluate import exact_match

    tokenizer = load_tokenizer(str(tok))
    renderer = ChatRenderer(tokenizer, "chatml")
    held_out = problems(args.eval, seed=0, split="test")
    results = {}
    for name, ckpt in (("pretrained", w / "pretrain" / "checkpoints"), ("after SFT", w / "sft" / "checkpoints")):
        _, model = load_full_model(latest_checkpoint(ckpt))
        results[name] = (exact_match(model, renderer, held_out, prompt_format="chat"),
                         exact_match(model, renderer, held_out, prompt_format="text"))
    print(f"\nheld-out exact match ({len(held_out)} problems, greedy): chat prompt / text prompt")
    for name, (chat, text) in results.items():
        print(f"  {name:<11} {100 * chat:5.1f}% / {100 * text:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
