"""RLHF on CPU, end to end, with a *learned* reward: pretrain a tiny model on the synthetic arithmetic task,
SFT it on the chat form, train a reward model (`scaletrain reward`, Bradley–Terry on correct vs wrong
answers, its body initialised from the SFT model), then GRPO scored by that model — the answer checker is
never used in training. Prints the reward model's held-out pair accuracy, GRPO's reward, and the policy's
held-out exact match (greedy) and sampled accuracy (T = 1) measured by the checker, before and after RL.
Every training step is the real CLI.

    python examples/rlhf_arith.py [--work runs/rlhf_arith] [--rm-steps 1000 --rm-lr 3e-4]
        [--far-negatives/--no-far-negatives] [--format-weight 3] [--grpo-steps 200 --kl-beta 0.1 ...]

About 15 minutes on 2 CPU cores from scratch. What it shows today is reward over-optimisation, measured
(BENCHMARKS.md): every reward model here reaches 99-100% held-out pair accuracy, and GRPO still finds text
it over-scores — "The answer is 3." for any question (near-miss pairs only; exact match 84% → 16%), then,
with far-off wrong answers added to its data (`--far-negatives`, the default), text that states nothing
("T1|im_end|>": 0%), then, with the `answer_format` reward (`--format-weight`, default 3), answers ending in
a mangled end-of-turn marker (19.5%); `--missing-stop-penalty 3` on top gave 7.5%. The machinery is what
the tests prove; making a 0.25 M-parameter reward model robust is not solved here.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from _cli import (  # examples/_cli.py
    REPO,
    add_grpo_args,
    prepare_arith_task,
    pretrain_and_sft,
    print_accuracies,
    run,
    run_grpo,
    task_parser,
)


def far_negatives(data: Path, out: Path, max_number: int, seed: int) -> Path:
    """Pairs of (correct answer, a uniformly drawn wrong one) for every training problem. The synthetic
    preference data only holds near misses (±1, ±2); a reward model that never saw a far-off answer
    rejected scores one like "The answer is 3." for any question — which GRPO then finds and exploits."""
    rng = random.Random(seed)
    with open(out, "w") as f:
        for line in (data / "sft_train.jsonl").read_text().splitlines():
            row = json.loads(line)
            prompt, answer = row["messages"][0]["content"], int(row["answer"])
            wrong = rng.choice([n for n in range(0, 2 * max_number * max(max_number, 2) + 1) if n != answer])
            f.write(json.dumps({"prompt": prompt, "chosen": f"The answer is {answer}.",
                                "rejected": f"The answer is {wrong}."}) + "\n")
    return out


def main() -> int:
    p = task_parser("runs/rlhf_arith")
    p.add_argument("--rm-steps", type=int, default=1000)
    p.add_argument("--rm-lr", type=float, default=3e-4)
    p.add_argument("--far-negatives", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the reward model on far-off wrong answers (default on; see the docstring)")
    p.add_argument("--format-weight", type=float, default=3.0,
                   help="weight of the answer_format reward next to the reward model's (0: the reward model alone)")
    p.add_argument("--missing-stop-penalty", type=float, default=0.0,
                   help="posttrain.rewards.missing_stop_penalty: for a turn that does not end with its end-of-turn marker")
    p.add_argument("--seed", type=int, default=0)
    add_grpo_args(p, kl_beta=0.1)  # higher than for a verifiable reward: a learned one can be gamed
    args = p.parse_args()
    w = (REPO / args.work).resolve()
    data, tok = prepare_arith_task(w, args.eval, args.max_number, args.ops)
    common = ["--config", "configs/tiny.toml", "--set", f"data.tokenizer={tok}", "--set", "train.eval_interval=0",
              "--set", "logging.interval=25", "--set", "logging.tensorboard=false"]
    sft_dir = pretrain_and_sft(w, data, tok, common, args.pretrain_steps, args.sft_steps)
    pairs = far_negatives(data, w / "rm_far_negatives.jsonl", args.max_number, args.seed) if args.far_negatives else None
    rm_dir = f"rm-s{args.rm_steps}-lr{args.rm_lr:g}{'-far' if pairs else ''}"
    train_files = ", ".join(f'"{f}"' for f in [data / "dpo_train.jsonl", *([pairs] if pairs else [])])
    run("reward", *common, "--set", f"checkpoint.init_from_hf={w / sft_dir / 'hf'}",
        "--set", f"posttrain.chat.train_data=[{train_files}]",
        "--set", f'posttrain.chat.valid_data=["{data / "dpo_test.jsonl"}"]', "--set", f"train.eval_interval={args.rm_steps // 4}",
        "--set", "train.eval_iters=6", "--set", f"train.run_dir={w / rm_dir}", "--set", f"train.steps={args.rm_steps}",
        "--set", f"optim.lr={args.rm_lr}", "--set", f"optim.min_lr={args.rm_lr / 10}", "--set", "optim.warmup_steps=20",
        "--set", "optim.weight_decay=0.0", "--set", "train.global_batch_size=32", "--set", "train.micro_batch_size=16",
        "--set", "posttrain.reward.center_coefficient=0.01")
    rewards = ["--set", 'posttrain.rewards.functions=["reward_model"]']
    if args.format_weight:
        rewards = ["--set", 'posttrain.rewards.functions=["reward_model", "answer_format"]',
                   "--set", f"posttrain.rewards.weights=[1.0, {args.format_weight}]"]
    prefix = rm_dir + (f"-fmt{args.format_weight:g}" if args.format_weight else "") + \
        (f"-stop{args.missing_stop_penalty:g}" if args.missing_stop_penalty else "")
    grpo_dir = run_grpo(w, data, common, args, sft_dir, prefix, *rewards, "--set", f"posttrain.rewards.model={w / rm_dir}",
                        "--set", f"posttrain.rewards.missing_stop_penalty={args.missing_stop_penalty}")

    records = [json.loads(line) for line in (w / rm_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_rewards_accuracy" in r][-1]
    grpo = [json.loads(line) for line in (w / grpo_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["reward"] for r in grpo[:20]) / 20, sum(r["reward"] for r in grpo[-20:]) / 20
    print(f"\nreward model: held-out pair accuracy {100 * val['val_rewards_accuracy']:.1f}% "
          f"({val['val_rewards_margin']:+.2f} mean margin; chance 50%)")
    print(f"GRPO: mean total reward of the first 20 steps {first:+.3f}, of the last 20 {last:+.3f}")
    print_accuracies(w, tok, args, [("after SFT", sft_dir), ("after RLHF", grpo_dir)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
