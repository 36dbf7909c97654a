"""Knowledge distillation on the bundled corpus, measured: a small student trained from scratch next to
the same student distilled from a larger teacher (dense forward KL, its top-k only, a hard/soft mix at
τ = 2, reverse KL), all for the same steps on the same data; judged by held-out cross-entropy on the
corpus' own next tokens and by the KL to the teacher, on the chapters of the validation split.

    python examples/distill_kjv.py                       # ≈ 15 min on 2 CPU cores
    python examples/distill_kjv.py --student-steps 100   # quicker, noisier

Finished runs are skipped on a re-run (each run directory resumes).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import torch
from _cli import REPO, prepare_kjv, run


@torch.no_grad()
def held_out_scores(teacher_dir: Path, students: dict[str, Path], tok_dir: Path, seq: int = 128) -> dict[str, tuple]:
    """(CE on the next tokens, forward KL(teacher ‖ model) at τ = 1) of each model, per token, over the
    validation split's documents (the corpus' last 2% of chapters, never trained on)."""
    from scaletrain.checkpoint import latest_checkpoint
    from scaletrain.checkpoint.hf import load_full_model
    from scaletrain.data.preprocess import BUILTIN_CORPUS
    from scaletrain.data.tokenizer import load_tokenizer
    from scaletrain.nn.kl import kl_per_token

    tok = load_tokenizer(str(tok_dir))
    with gzip.open(BUILTIN_CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    ids = [i for t in texts[len(texts) - len(texts) // 50:] for i in tok.encode(t) + [tok.eos_id]]
    rows = torch.tensor(ids[: len(ids) // (seq + 1) * (seq + 1)]).view(-1, seq + 1)
    inputs, labels = rows[:, :-1], rows[:, 1:]
    teacher = load_full_model(latest_checkpoint(teacher_dir / "checkpoints"))[1].eval()
    t_logits = torch.cat([teacher(b) for b in inputs.split(16)])
    out = {}
    for name, run_dir in {"teacher": teacher_dir, **students}.items():
        model = load_full_model(latest_checkpoint(run_dir / "checkpoints"))[1].eval()
        logits = torch.cat([model(b) for b in inputs.split(16)])
        ce = torch.nn.functional.cross_entropy(logits[..., : tok.vocab_size].flatten(0, 1), labels.flatten())
        kl = kl_per_token(logits, t_logits, vocab_limit=tok.vocab_size).mean()
        out[name] = (float(ce), float(kl), labels.numel())
    return out


def median_tokens_per_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="runs/distill_kjv")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--student-steps", type=int, default=300)
    args = p.parse_args()
    work = REPO / args.work
    tok, _ = prepare_kjv()
    common = ["--config", "configs/tiny.toml", "--set", "logging.tensorboard=false",
              "--set", "checkpoint.interval=0"]
    teacher = work / "teacher"
    run("train", *common, "--set", f"train.run_dir={teacher}", "--set", f"train.steps={args.teacher_steps}",
        "--set", "model.hidden_size=128", "--set", "model.ffn_hidden_size=384", "--set", "model.num_layers=6",
        "--set", f"train.eval_interval={args.teacher_steps}")
    student = ["--set", "model.num_layers=2", "--set", "model.hidden_size=64", "--set", "model.ffn_hidden_size=192",
               "--set", f"train.steps={args.student_steps}", "--set", "train.eval_interval=0"]
    runs = {
        "from scratch (CE)": ("train", []),
        "forward KL": ("distill", []),
        "forward KL, top-32": ("distill", ["posttrain.distill.top_k=32"]),
        "α=0.5, τ=2": ("distill", ["posttrain.distill.alpha=0.5", "posttrain.distill.temperature=2.0"]),
        "reverse KL": ("distill", ["posttrain.distill.loss=reverse_kl"]),
    }
    dirs = {}
    for i, (name, (command, sets)) in enumerate(runs.items()):
        dirs[name] = work / f"student{i}"
        extra = [x for s in sets for x in ("--set", s)]
        if command == "distill":
            extra += ["--set", f"posttrain.distill.teacher={teacher}"]
        run(command, *common, *student, "--set", f"train.run_dir={dirs[name]}", *extra)
    scores = held_out_scores(teacher, dirs, tok)
    n = scores["teacher"][2]
    print(f"\nheld out: the validation split's chapters ({n:,} tokens), per token; teacher 6L h128 trained "
          f"{args.teacher_steps} steps, students 2L h64 trained {args.student_steps} steps each")
    print(f"  {'model':<20} {'CE (next token)':>16} {'KL(teacher‖model)':>18} {'train tok/s':>12}")
    for name, (ce, kl, _) in scores.items():
        speed = median_tokens_per_s(teacher if name == "teacher" else dirs[name])
        print(f"  {name:<20} {ce:16.3f} {kl:18.3f} {speed:12,.0f}")

if __name__ == "__main__":
    main()
