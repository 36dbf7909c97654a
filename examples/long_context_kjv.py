"""Long-context extension on CPU, measured: a tiny model pretrained on 128-token sequences is continued at
512 tokens with context parallelism (cp=2: each rank holds half of every sequence), and `scaletrain eval`
scores held-out perplexity with 128- and 512-token windows before and after — the Llama 3 recipe's shape
(short pretraining, then a long-context stage on the same data mix), at toy scale.

    python examples/long_context_kjv.py              # ≈ 6 min on 2 CPU cores
    python examples/long_context_kjv.py --base-steps 300 --long-steps 100

Finished runs are skipped on a re-run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys

from _cli import REPO, prepare_kjv, run


def torchrun(nproc: int, *args: str) -> None:
    print(f"+ torchrun --nproc_per_node {nproc} -m scaletrain.cli", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m",
                    "scaletrain.cli", *args], cwd=REPO, check=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="runs/long_kjv")
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--long-steps", type=int, default=100)
    args = p.parse_args()
    work = REPO / args.work
    tok, _ = prepare_kjv()
    held_out = work / "held_out.jsonl"  # the validation split's chapters (data.split 98,2,0: the last 2%)
    if not held_out.exists():
        work.mkdir(parents=True, exist_ok=True)
        from scaletrain.data.preprocess import BUILTIN_CORPUS

        with gzip.open(BUILTIN_CORPUS, "rt") as f:
            texts = [json.loads(line)["text"] for line in f]
        held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[len(texts) - len(texts) // 50:]))
    common = ["--config", "configs/tiny.toml", "--set", "logging.tensorboard=false", "--set", "checkpoint.interval=0",
              "--set", "train.eval_interval=0", "--set", "model.max_position_embeddings=512"]
    base, long = work / "base", work / "long"
    run("train", *common, "--set", f"train.run_dir={base}", "--set", f"train.steps={args.base_steps}",
        "--set", "checkpoint.export_hf=hf")
    # The long stage: 512-token sequences (a quarter as many per step: the same tokens per step), from the
    # base's weights, at a lower peak learning rate, split over 2 context-parallel ranks.
    torchrun(2, "train", *common, "--set", f"train.run_dir={long}", "--set", f"train.steps={args.long_steps}",
             "--set", "train.seq_length=512", "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=2",
             "--set", "parallel.cp=2", "--set", f"checkpoint.init_from_hf={base / 'hf'}", "--set", "optim.lr=1e-3",
             "--set", "optim.warmup_steps=10")
    results = {}
    for name, model in (("base (trained at 128)", base), ("extended (+512, cp2)", long)):
        for seq in (128, 512):
            out = work / f"eval_{model.name}_{seq}.json"
            run("eval", str(model), "--task", f"perplexity:{held_out}", "--seq-length", str(seq), "--output", str(out))
            results[(name, seq)] = json.loads(out.read_text())["tasks"][f"perplexity:{held_out.name}"]
    print("\nheld-out perplexity (validation chapters), windows of 128 and 512 tokens:")
    print(f"  {'model':<24} {'ppl @128':>10} {'ppl @512':>10}")
    for name in dict.fromkeys(n for n, _ in results):
        print(f"  {name:<24} {results[(name, 128)]['perplexity']:10.2f} {results[(name, 512)]['perplexity']:10.2f}")


if __name__ == "__main__":
    main()
