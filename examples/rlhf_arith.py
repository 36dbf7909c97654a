"""RLHF on CPU, end to end, with a *learned* reward: pretrain a tiny model on the synthetic arithmetic task,
SFT it on the chat form, train a reward model (`scaletrain reward`, Bradley–Terry on correct vs near-miss
answers, its body initialised from the SFT model), then GRPO whose only reward is that model's score —
the answer checker is never used in training. Prints the reward model's held-out pair accuracy and the
policy's held-out exact match (greedy) and sampled accuracy (T = 1), both measured by the checker,
before and after RL. Every training step is the real CLI.

    python examples/rlhf_arith.py [--work runs/rlhf_arith] [--rm-steps 300] [--grpo-steps 200]
        [--group-size 8 --prompts-per-step 8 --grpo-lr 1e-4 --kl-beta 0.02]

About 20 minutes on 2 CPU cores from scratch (figures in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json

from _cli import REPO, prepare_arith_task, run  # examples/_cli.py (the script's folder is on sys.path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="runs/rlhf_arith")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--rm-steps", type=int, default=300)
    p.add_argument("--rm-lr", type=float, default=5e-4)
    p.add_argument("--grpo-steps", type=int, default=200)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--grpo-lr", type=float, default=1e-4)
    p.add_argument("--kl-beta", type=float, default=0.02)
    p.add_argument("--eval", type=int, default=200, help="held-out problems to evaluate")
    p.add_argument("--max-number", type=int, default=9, help="task difficulty: largest first operand")
    p.add_argument("--ops", default="add,sub", help="task operations (add, sub, mul)")
    args = p.parse_args()
    w = (REPO / args.work).resolve()
    data, tok = prepare_arith_task(w, args.eval, args.max_number, args.ops)
    common = ["--config", "configs/tiny.toml", "--set", f"data.tokenizer={tok}", "--set", "train.eval_interval=0",
              "--set", "logging.interval=25", "--set", "logging.tensorboard=false"]
    run("train", *common, "--set", f'data.prefixes=["{w / "pretrain_text_document"}"]',
        "--set", f"train.run_dir={w / 'pretrain'}", "--set", f"train.steps={args.pretrain_steps}",
        "--set", "checkpoint.export_hf=hf")
    run("sft", *common, "--set", f"checkpoint.init_from_hf={w / 'pretrain' / 'hf'}",
        "--set", f'posttrain.train_data=["{data / "sft_train.jsonl"}"]', "--set", f"train.run_dir={w / 'sft'}",
        "--set", f"train.steps={args.sft_steps}", "--set", "optim.lr=1e-3", "--set", "optim.warmup_steps=5",
        "--set", "checkpoint.export_hf=hf")
    rm_dir = f"rm-s{args.rm_steps}-lr{args.rm_lr:g}"
    run("reward", *common, "--set", f"checkpoint.init_from_hf={w / 'sft' / 'hf'}",
        "--set", f'posttrain.train_data=["{data / "dpo_train.jsonl"}"]',
        "--set", f'posttrain.valid_data=["{data / "dpo_test.jsonl"}"]', "--set", f"train.eval_interval={args.rm_steps}",
        "--set", "train.eval_iters=12", "--set", f"train.run_dir={w / rm_dir}", "--set", f"train.steps={args.rm_steps}",
        "--set", f"optim.lr={args.rm_lr}", "--set", f"optim.min_lr={args.rm_lr / 10}", "--set", "optim.warmup_steps=10",
        "--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=8", "--set", "posttrain.reward_center=0.01")
    grpo_dir = f"{rm_dir}-grpo-s{args.grpo_steps}-g{args.group_size}-p{args.prompts_per_step}-lr{args.grpo_lr:g}-kl{args.kl_beta:g}"
    completions = args.group_size * args.prompts_per_step
    run("grpo", *common, "--set", f"checkpoint.init_from_hf={w / 'sft' / 'hf'}",
        "--set", f'posttrain.train_data=["{data / "sft_train.jsonl"}"]', "--set", f"train.run_dir={w / grpo_dir}",
        "--set", f"train.steps={args.grpo_steps}", "--set", f"optim.lr={args.grpo_lr}", "--set", "optim.warmup_steps=5",
        "--set", f"optim.min_lr={args.grpo_lr}", "--set", "optim.weight_decay=0.0",
        "--set", f"train.global_batch_size={completions}", "--set", f"train.micro_batch_size={min(completions, 32)}",
        "--set", f"posttrain.group_size={args.group_size}", "--set", "posttrain.max_new_tokens=20",
        "--set", f"posttrain.kl_beta={args.kl_beta}", "--set", 'posttrain.rewards=["reward_model"]',
        "--set", f"posttrain.reward_model={w / rm_dir}")

    from scaletrain.checkpoint import latest_checkpoint
    from scaletrain.checkpoint.hf import load_full_model
    from scaletrain.data.synth import problems
    from scaletrain.data.tokenizer import load_tokenizer
    from scaletrain.posttrain.chat import ChatRenderer
    from scaletrain.posttrain.evaluate import sampled_accuracy

    records = [json.loads(line) for line in (w / rm_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_rewards_accuracy" in r][-1]
    grpo = [json.loads(line) for line in (w / grpo_dir / "metrics.jsonl").read_text().splitlines()]
    renderer = ChatRenderer(load_tokenizer(str(tok)), "chatml")
    held_out = problems(args.eval, seed=0, split="test", max_number=args.max_number, ops=tuple(args.ops.split(",")))
    rows = {}
    for name, run_dir in (("after SFT", "sft"), ("after RLHF", grpo_dir)):
        _, model = load_full_model(latest_checkpoint(w / run_dir / "checkpoints"))
        rows[name] = (sampled_accuracy(model, renderer, held_out, temperature=0.0),
                      sampled_accuracy(model, renderer, held_out, samples=8))
    first, last = sum(r["reward"] for r in grpo[:20]) / 20, sum(r["reward"] for r in grpo[-20:]) / 20
    print(f"\nreward model: held-out pair accuracy {100 * val['val_rewards_accuracy']:.1f}% "
          f"({val['val_rewards_margin']:+.2f} mean margin; chance 50%)")
    print(f"GRPO on its score: mean reward of the first 20 steps {first:+.3f}, of the last 20 {last:+.3f}")
    print(f"held-out: {len(held_out)} problems (chat prompt), scored by the answer checker")
    print(f"  {'model':<11} {'exact match (greedy)':>20} {'sampled accuracy (T=1, 8 per problem)':>38}")
    for name, (em, acc) in rows.items():
        print(f"  {name:<11} {100 * em:19.1f}% {100 * acc:37.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
