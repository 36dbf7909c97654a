"""parallel.compile benchmark: eager vs torch.compile'd blocks, the same run through `Trainer.run()`.

    python benchmarks/bench_compile.py [--quick]

Baseline: the same config with parallel.compile = false, run in this process right before the
compiled one (same data, seed, thread count). Reported per config: the first step (the compiled run
pays dynamo + inductor there; a fresh inductor cache directory, so it is the cold cost), the median
of the later steps, their tokens/s ratio, and the largest loss difference over the run (float32:
inductor reorders reductions, so not bit-equal; the parity tests check compile in float64).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
_CACHE = tempfile.mkdtemp(prefix="inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE  # cold compile: nothing from earlier runs

import torch  # noqa: E402

from scaletrain.config import load_config  # noqa: E402
from scaletrain.data.preprocess import BUILTIN_CORPUS, preprocess  # noqa: E402
from scaletrain.data.tokenizer import train_sentencepiece  # noqa: E402


def _run(config: str, overrides: list[str], run_dir: Path) -> list[dict]:
    from scaletrain.build import build_trainer

    trainer = build_trainer(load_config(config, overrides + [f"train.run_dir={run_dir}"]))
    try:
        trainer.run()
    finally:
        trainer.sinks.close()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def bench(name: str, config: str, overrides: list[str], work: Path) -> dict:
    out: dict = {"name": name}
    for compiled in (False, True):
        torch._dynamo.reset()
        recs = _run(config, overrides + [f"parallel.compile={str(compiled).lower()}"], work / f"{name}-{compiled}")
        later = [r["step_time_s"] for r in recs[2:]]  # step 2 may still recompile (dynamic shapes)
        out[compiled] = {"first": recs[0]["step_time_s"], "steady": statistics.median(later),
                         "tok_s": statistics.median(r["tokens_per_s"] for r in recs[2:]),
                         "losses": [r["loss"] for r in recs]}
    out["speedup"] = out[False]["steady"] / out[True]["steady"]
    out["loss_diff"] = max(abs(a - b) for a, b in zip(out[False]["losses"], out[True]["losses"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = ap.parse_args()
    threads = 2
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    steps = 6 if args.quick else 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = work / "tok"
        train_sentencepiece((json.loads(line)["text"] for line in __import__("gzip").open(BUILTIN_CORPUS, "rt")),
                            tok, 2048)
        preprocess([str(BUILTIN_CORPUS)], str(tok), str(work / "kjv"), workers=1)
        common = [f"data.tokenizer={tok}", f'data.prefixes=["{work / "kjv"}"]', "train.eval_interval=0",
                  "checkpoint.save_at_end=false", "checkpoint.interval=0", "logging.tensorboard=false",
                  "logging.interval=1000000", f"train.threads={threads}", "train.deterministic=false",
                  "train.device=cpu", "precision.dtype=float32", "optim.warmup_steps=0", f"train.steps={steps}"]
        tiny = str(REPO / "configs/tiny.toml")
        rows.append(bench("tiny", tiny, common, work))
        rows.append(bench("tiny, full recompute", tiny, common + ["parallel.recompute=full"], work))
        big = common + ["model.num_layers=2", "train.seq_length=256", "train.global_batch_size=2",
                        "train.micro_batch_size=1"]
        rows.append(bench("llama3_1b shape, 2 layers, seq 256", str(REPO / "configs/llama3_1b.toml"), big, work))
    load_after = os.getloadavg()
    print(f"\n# scaletrain parallel.compile benchmark — {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, {threads} threads, "
          f"{steps} steps; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    print("| config | eager step (s) | compiled step (s) | eager tok/s | compiled tok/s | speed-up | "
          "first step eager / compiled (s) | max loss diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, c = r[False], r[True]
        print(f"| {r['name']} | {e['steady']:.4f} | {c['steady']:.4f} | {e['tok_s']:,.0f} | {c['tok_s']:,.0f} | "
              f"{r['speedup']:.2f}× | {e['first']:.2f} / {c['first']:.2f} | {r['loss_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
