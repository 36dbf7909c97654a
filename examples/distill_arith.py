"""On-policy distillation on CPU, measured: a small student on the synthetic arithmetic task learns from a
larger teacher three ways for the same number of steps — more SFT on the reference answers, distillation
on those reference conversations (teacher-forced, forward KL), and on-policy distillation (the student
samples its own answers and the teacher's per-token reverse KL on them is the loss). Prints held-out
exact match (greedy) and sampled accuracy (temperature 1) of teacher and students. Every stage is the
real CLI.

    python examples/distill_arith.py [--work runs/distill_arith] [--steps 150]

Finished stages are skipped on a re-run.
"""

from __future__ import annotations

from _cli import REPO, prepare_arith_task, pretrain_and_sft, print_accuracies, run, task_parser


def main() -> int:
    p = task_parser("runs/distill_arith")
    p.add_argument("--student-sft-steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=150, help="steps of each of the three ways")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    w = (REPO / args.work).resolve()
    data, tok = prepare_arith_task(w, args.eval, args.max_number, args.ops)
    common = ["--config", "configs/tiny.toml", "--set", f"data.tokenizer={tok}", "--set", "train.eval_interval=0",
              "--set", "logging.interval=25", "--set", "logging.tensorboard=false"]
    teacher = pretrain_and_sft(w, data, tok, common, args.pretrain_steps, args.sft_steps, prefix="teacher-")
    small = ["--set", "model.num_layers=2", "--set", "model.ffn_hidden_size=128"]
    student = pretrain_and_sft(w, data, tok, common + small, args.pretrain_steps, args.student_sft_steps,
                               prefix="student-")
    start = ["--set", f"checkpoint.init_from_hf={w / student / 'hf'}", "--set", f"train.steps={args.steps}",
             "--set", f"optim.lr={args.lr}", "--set", f"optim.min_lr={args.lr / 10}", "--set", "optim.warmup_steps=5",
             "--set", f'posttrain.chat.train_data=["{data / "sft_train.jsonl"}"]']
    distill = ["--set", f"posttrain.distill.teacher={w / teacher / 'hf'}"]
    ways = {
        "+SFT": ("sft", []),
        "+distill": ("distill", distill),
        "+on-policy": ("distill", [*distill, "--set", "posttrain.distill.on_policy=true", "--set",
                                   "posttrain.distill.loss=reverse_kl", "--set", "posttrain.rollout.max_new_tokens=20"]),
    }
    stages = [("teacher", teacher), ("student", student)]
    for name, (command, extra) in ways.items():
        run_dir = f"student{name.replace('+', '-')}-s{args.steps}-lr{args.lr:g}"
        run(command, *common, *start, *extra, "--set", f"train.run_dir={w / run_dir}")
        stages.append((f"student{name}", run_dir))
    print_accuracies(w, tok, args, stages)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
