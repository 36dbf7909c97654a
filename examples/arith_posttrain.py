"""Post-training on CPU, end to end, on the synthetic arithmetic task: pretrain a tiny model on the task's
text form, export it to Hugging Face format, fine-tune it (SFT) on the chat form from that export, export
again, run DPO on (correct, near-miss) pairs, and print held-out exact-match accuracy and preference
accuracy after each stage. Every training step is the real CLI.

    python examples/arith_posttrain.py [--work runs/arith] [--max-number 9 --ops add,sub] [--pretrain-steps 600]
        [--sft-steps 300] [--dpo-steps 300 --dpo-lr 2e-4 --dpo-beta 0.2 --dpo-nll 0.5]

About 6 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse

from _cli import REPO, prepare_arith_task, run  # examples/_cli.py (the script's folder is on sys.path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="runs/arith")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--dpo-steps", type=int, default=300)
    p.add_argument("--dpo-lr", type=float, default=2e-4)
    p.add_argument("--dpo-beta", type=float, default=0.2)
    p.add_argument("--dpo-nll", type=float, default=0.5, help="posttrain.dpo.nll_weight (RPO)")
    p.add_argument("--eval", type=int, default=200, help="held-out problems to evaluate")
    p.add_argument("--max-number", type=int, default=9, help="task difficulty: largest first operand")
    p.add_argument("--ops", default="add,sub", help="task operations (add, sub, mul)")
    args = p.parse_args()
    w = (REPO / args.work).resolve()
    data, tok = prepare_arith_task(w, args.eval, args.max_number, args.ops)
    common = ["--config", "configs/tiny.toml", "--set", f"data.tokenizer={tok}", "--set", "train.eval_interval=0",
              "--set", "logging.interval=50", "--set", "logging.tensorboard=false"]
    run("train", *common, "--set", f'data.prefixes=["{w / "pretrain_text_document"}"]',
        "--set", f"train.run_dir={w / 'pretrain'}", "--set", f"train.steps={args.pretrain_steps}")
    run("convert", "to-hf", str(w / "pretrain" / "checkpoints"), str(w / "pretrain_hf"))
    run("sft", *common, "--set", f"checkpoint.init_from_hf={w / 'pretrain_hf'}",
        "--set", f'posttrain.chat.train_data=["{data / "sft_train.jsonl"}"]', "--set", f"train.run_dir={w / 'sft'}",
        "--set", f"train.steps={args.sft_steps}", "--set", "optim.lr=1e-3", "--set", "optim.warmup_steps=10")
    run("convert", "to-hf", str(w / "sft" / "checkpoints"), str(w / "sft_hf"))
    dpo_dir = f"dpo-s{args.dpo_steps}-lr{args.dpo_lr:g}-b{args.dpo_beta:g}-nll{args.dpo_nll:g}"
    run("dpo", *common, "--set", f"checkpoint.init_from_hf={w / 'sft_hf'}",
        "--set", f'posttrain.chat.train_data=["{data / "dpo_train.jsonl"}"]', "--set", f"train.run_dir={w / dpo_dir}",
        "--set", f"train.steps={args.dpo_steps}", "--set", f"optim.lr={args.dpo_lr}", "--set", "optim.warmup_steps=10",
        "--set", f"optim.min_lr={args.dpo_lr / 10}", "--set", f"posttrain.dpo.beta={args.dpo_beta}",
        "--set", f"posttrain.dpo.nll_weight={args.dpo_nll}", "--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=8")

    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.checkpoint import latest_checkpoint
    from scaletrain.checkpoint.hf import load_full_model
    from scaletrain.data.synth import problems
    from scaletrain.data.tokenizer import load_tokenizer
    from scaletrain.evaluation.synthetic import exact_match, pair_logprobs, preference_accuracy
    from scaletrain.stages.preference.data import PreferenceDataset, read_pairs

    tokenizer = load_tokenizer(str(tok))
    renderer = ChatRenderer(tokenizer, "chatml")
    held_out = problems(args.eval, seed=0, split="test", max_number=args.max_number, ops=tuple(args.ops.split(",")))
    pairs = PreferenceDataset(read_pairs([str(data / "dpo_test.jsonl")]), renderer, tokenizer, 128)
    rows, logps = {}, {}
    for name, run_dir in (("pretrained", "pretrain"), ("after SFT", "sft"), ("after DPO", dpo_dir)):
        _, model = load_full_model(latest_checkpoint(w / run_dir / "checkpoints"))
        logps[name] = pair_logprobs(model, pairs)
        rows[name] = (exact_match(model, renderer, held_out), preference_accuracy(logps[name]))
    print(f"\nheld-out: {len(held_out)} problems (greedy, chat prompt), {len(pairs)} preference pairs")
    print(f"  {'model':<11} {'exact match':>11} {'prefers correct':>15}")
    for name, (em, pref) in rows.items():
        print(f"  {name:<11} {100 * em:10.1f}% {100 * pref:14.1f}%")
    implicit = preference_accuracy(logps["after DPO"], logps["after SFT"])
    print(f"  DPO implicit-reward accuracy against the SFT reference: {100 * implicit:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
