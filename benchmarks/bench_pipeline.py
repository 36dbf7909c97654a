"""Pipeline bubble and in-flight activations: measured per rank against 1F1B / interleaved theory.

    python benchmarks/bench_pipeline.py [--pp 2] [--hidden 768] [--seq 128] [--steps 6]

Forked gloo ranks (one thread each) run the real schedule on a Llama whose layers split evenly.
Idle time is what a rank spends blocked in receives during one step's schedule (the optimizer step
excluded); the bubble fraction is idle / schedule time, reported for the worst rank next to the
theory (pp − 1) / (vpp·m + pp − 1). "in flight" is the most microbatches (per chunk) whose
activations stage 0 held at once, next to the schedule's bound (1F1B: pp; interleaved: its warm-up
+ 1) — activation memory is that count times one microbatch's activations. "step" is the median
wall time of one step's schedule on the slowest rank (torch.distributed's p2p, gloo).
Keep one core per rank (pp ≤ cores) for a meaningful bubble: oversubscribed ranks wait for a CPU,
not for each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from scaletrain.config.schema import ModelConfig, ParallelConfig  # noqa: E402
from scaletrain.config.validate import resolve_model  # noqa: E402
from scaletrain.distributed import ParallelDims  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.nn import init_parameters  # noqa: E402
from scaletrain.parallel.parallelize import parallelize  # noqa: E402
from scaletrain.parallel.pipeline.schedules import forward_backward_pipelining  # noqa: E402
from scaletrain.stages.pretrain.objective import LanguageModelingObjective  # noqa: E402

from dist_harness import run_ranks  # noqa: E402


def _measure(rank: int, world: int, cfg: ModelConfig, vpp: int, m: int, b: int, s: int, steps: int) -> dict:
    pcfg = ParallelConfig(pp=world, vpp=vpp)
    dims = ParallelDims.from_config(pcfg, world, rank)
    with torch.device("meta"):
        model = build_model(cfg)
    parallelize(model, dims, pcfg)
    init_parameters(model, 0)
    g = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(m):
        t = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
        mbs.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(b, s)})
    objective = LanguageModelingObjective()
    fracs, peaks, times = [], [], []
    for i in range(steps + 1):  # the first step warms up allocator and threads
        dims.comm("world").barrier()
        stats: dict = {}
        t0 = time.perf_counter()
        forward_backward_pipelining(objective.forward_step, mbs, model.pipeline_chunks, dims,
                                    normaliser=m * b * s, stats=stats)
        elapsed = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        if i:
            fracs.append(stats["wait_s"] / elapsed)
            peaks.append(stats["peak_in_flight"])
            times.append(elapsed)
    return {"bubble": statistics.median(fracs), "peak": max(peaks), "step_s": statistics.median(times)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=2)
    # 768: a microbatch's compute must dwarf gloo's per-message latency on localhost, or the measured
    # idle time is mostly communication and the interleaved rows (twice the messages) drift from theory.
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=64, help="small, so the head adds little to the last stage")
    args = ap.parse_args()
    pp = args.pp
    cfg = resolve_model(ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                    num_kv_heads=4, ffn_hidden_size=4 * args.hidden),
                        tokenizer_vocab=None, tp=1, seq_length=args.seq)
    load0 = os.getloadavg()[0]
    rows = []
    for vpp in (1, 2):
        for m in (pp, 2 * pp, 4 * pp, 8 * pp):
            res = run_ranks(pp, _measure, cfg, vpp, m, args.micro_batch, args.seq, args.steps, timeout=600,
                            p2p="gloo")  # the transport runs use, not the tests' NCCL-like one
            theory = (pp - 1) / (vpp * m + pp - 1)
            bound = pp if vpp == 1 else min((pp - 1) * 2 + (vpp - 1) * pp + 1, m * vpp)
            rows.append((vpp, m, max(r["bubble"] for r in res), statistics.mean(r["bubble"] for r in res), theory,
                         res[0]["peak"], bound, max(r["step_s"] for r in res)))
    load1 = os.getloadavg()[0]
    print(f"\n# pipeline bubble — pp={pp}, {args.layers} layers, h={args.hidden}, vocab={args.vocab}, b={args.micro_batch}, "
          f"s={args.seq}, fp32, {os.cpu_count()} CPUs, 1 thread per rank; load average {load0:.2f} → {load1:.2f}\n")
    print("| schedule | microbatches m | measured bubble, worst rank | mean over ranks | theory (pp-1)/(vpp·m+pp-1) |"
          " worst − theory | stage-0 peak in flight | bound | step (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for vpp, m, measured, mean, theory, peak, bound, step_s in rows:
        diff = measured - theory
        ok &= abs(diff) <= 0.05 and peak <= bound
        name = "1F1B" if vpp == 1 else f"interleaved vpp={vpp}"
        print(f"| {name} | {m} | {measured:.3f} | {mean:.3f} | {theory:.3f} | {diff:+.3f} | {peak} | {bound} "
              f"| {step_s:.3f} |")
    print(f"\nwithin 0.05 of theory and within the in-flight bound everywhere: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
