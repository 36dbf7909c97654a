"""PPO against GRPO on CPU, measured: the distillation example's weak student (2 layers, 24.5% exact match on
the synthetic task) trained on the verifiable answer reward with the same number of sampled completions
— PPO with a learned critic (one completion per prompt, 2 epochs per batch), GRPO with group-relative
advantages (8 per prompt). Prints held-out exact match (greedy) and sampled accuracy (temperature 1).

    python examples/ppo_arith.py [--work runs/distill_arith] [--steps 200]

Reuses (or makes) the student of examples/distill_arith.py; finished stages are skipped on a re-run.
"""

from __future__ import annotations

from _cli import REPO, prepare_arith_task, pretrain_and_sft, print_accuracies, run, task_parser


def main() -> int:
    p = task_parser("runs/distill_arith")
    p.add_argument("--student-sft-steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64, help="sampled completions per step")
    args = p.parse_args()
    w = (REPO / args.work).resolve()
    data, tok = prepare_arith_task(w, args.eval, args.max_number, args.ops)
    common = ["--config", "configs/tiny.toml", "--set", f"data.tokenizer={tok}", "--set", "train.eval_interval=0",
              "--set", "logging.interval=50", "--set", "logging.tensorboard=false"]
    small = ["--set", "model.num_layers=2", "--set", "model.ffn_hidden_size=128"]
    student = pretrain_and_sft(w, data, tok, common + small, args.pretrain_steps, args.student_sft_steps,
                               prefix="student-")
    rl = ["--set", f"checkpoint.init_from_hf={w / student / 'hf'}", "--set", f"train.steps={args.steps}",
          "--set", f'posttrain.chat.train_data=["{data / "sft_train.jsonl"}"]', "--set", 'posttrain.rewards.functions=["math_answer"]',
          "--set", f"train.global_batch_size={args.batch}", "--set", f"train.micro_batch_size={min(args.batch, 32)}",
          "--set", "optim.lr=1e-4", "--set", "optim.min_lr=1e-4", "--set", "optim.warmup_steps=5",
          "--set", "optim.weight_decay=0.0", "--set", "posttrain.grpo.beta=0.02", "--set", "posttrain.ppo.kl_coef=0.02", "--set", "posttrain.rollout.max_new_tokens=20"]
    ppo_dir, grpo_dir = f"student-ppo-s{args.steps}-b{args.batch}", f"student-grpo-s{args.steps}-b{args.batch}"
    run("ppo", *common, *rl, "--set", f"posttrain.ppo.critic={w / student / 'hf'}", "--set", "posttrain.ppo.group_size=1",
        "--set", "posttrain.ppo.critic_lr=3e-4", "--set", "posttrain.ppo.iterations=2",
        "--set", f"train.run_dir={w / ppo_dir}")
    run("grpo", *common, *rl, "--set", "posttrain.grpo.group_size=8", "--set", f"train.run_dir={w / grpo_dir}")
    print_accuracies(w, tok, args, [("student", student), ("+PPO", ppo_dir), ("+GRPO", grpo_dir)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
