"""Overlap of data-parallel communication with compute, on CPU (gloo): where each collective is posted and
waited for, relative to the blocks' forward and backward, from the phase clock's events and a torch profiler
trace per rank (chrome://tracing or Perfetto: `scaletrain.mark.*` ranges are the posts and waits).

    python benchmarks/bench_overlap.py [--dp 2] [--pp 1] [--vpp 1] [--zero] [--dtype bfloat16] [--trace DIR]

Per rank it reports, for the third step: how many gradient buckets were posted during the last backward
of the rank's stage and how many blocks' backward ran after the first post (work the reduction overlaps);
with --zero, how many blocks' forward ran while the parameter all-gathers were in flight (between a
bucket's post and its wait); and the step time with overlap on and off.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from scaletrain.config.validate import resolve_model  # noqa: E402
from scaletrain.distributed import ParallelDims  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.nn import init_parameters  # noqa: E402
from scaletrain.parallel.parallelize import parallelize  # noqa: E402
from scaletrain.profile.phases import mark, recording  # noqa: E402
from scaletrain.stages.pretrain.objective import LanguageModelingObjective  # noqa: E402
from scaletrain.trainer.optimizer import build_optimizer  # noqa: E402
from scaletrain.trainer.precision import Precision  # noqa: E402
from scaletrain.trainer.step import train_step  # noqa: E402

from dist_harness import run_ranks  # noqa: E402

CPU = torch.device("cpu")


def _rank(rank: int, world: int, args: argparse.Namespace, overlap: bool) -> dict:
    torch.set_num_threads(1)
    m = resolve_model(ModelConfig(vocab_size=2048, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                  num_kv_heads=4, ffn_hidden_size=4 * args.hidden), tokenizer_vocab=None, tp=1,
                      seq_length=args.seq)
    pcfg = ParallelConfig(pp=args.pp, vpp=args.vpp, bucket_mb=args.bucket_mb, overlap_grad_reduce=overlap,
                          overlap_param_gather=overlap)
    dims = ParallelDims.from_config(pcfg, world, rank)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    with torch.device("meta"):
        model = build_model(m, dtype=dtype)
    parallelize(model, dims, pcfg, CPU, shard_optimizer=args.zero)
    init_parameters(model, 0)
    for key, block in model.layers.items():
        block.register_forward_pre_hook(lambda mod, a, key=key: mark(f"block{key}.forward"))
        block.register_full_backward_pre_hook(lambda mod, g, key=key: mark(f"block{key}.backward"))
    opt = build_optimizer(model, OptimConfig(distributed=args.zero), CPU, dims)
    precision = Precision(dtype, dtype if dtype == torch.bfloat16 else None, "cpu", "bench")
    n_micro = args.microbatches
    g = torch.Generator().manual_seed(rank)
    times, events = [], []
    for step in range(4):
        t = torch.randint(0, 2048, (n_micro, 2, args.seq + 1), generator=g)
        mbs = [{"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(2, args.seq)} for x in t]
        prof = None
        if step == 2 and args.trace and overlap:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        t0 = time.perf_counter()
        with recording(CPU) as clock:
            train_step(model, opt, LanguageModelingObjective(), mbs, lr=1e-3, clip_grad=1.0, precision=precision,
                       device=CPU, dims=dims)
        times.append(time.perf_counter() - t0)
        events.append(clock.events)
        if prof is not None:
            prof.__exit__(None, None, None)
            Path(args.trace).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(args.trace) / f"overlap_rank{rank}.json"))
    ev = events[2]
    idx = [i for i, (k, w) in enumerate(ev) if k == "mark" and ".post[" in w and w.startswith("dp.")]
    last_bwd = [i for i, (k, w) in enumerate(ev) if k == "begin" and w == "backward"][-1]
    end_bwd = [i for i, (k, w) in enumerate(ev) if k == "end" and w == "backward"][-1]
    in_bwd = [i for i in idx if last_bwd < i < end_bwd]
    after = sum(1 for i, (k, w) in enumerate(ev) if k == "mark" and w.endswith(".backward") and idx and i > min(idx))
    gathered = 0
    if args.zero:
        posts = [i for i, (k, w) in enumerate(ev) if k == "mark" and w.startswith("zero.all_gather.post")]
        waits = [i for i, (k, w) in enumerate(ev) if k == "mark" and w.startswith("zero.all_gather.wait")]
        if posts and waits:
            gathered = sum(1 for i, (k, w) in enumerate(ev) if k == "mark" and w.endswith(".forward")
                           and min(posts) < i < max(waits))
    return {"posted": len(idx), "in_last_backward": len(in_bwd), "backward_after_first_post": after,
            "forward_under_gathers": gathered, "step_s": sorted(times[1:])[len(times[1:]) // 2],
            "pp_rank": dims.pp_rank}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=1)
    ap.add_argument("--zero", action="store_true")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--bucket-mb", type=float, default=1.0)
    ap.add_argument("--trace", default="", help="write a torch profiler trace per rank (step 3) here")
    args = ap.parse_args()
    world = args.dp * args.pp
    on = run_ranks(world, _rank, args, True, timeout=600)
    off = run_ranks(world, _rank, args, False, timeout=600)
    print(f"# dp{args.dp}·pp{args.pp}{f'·vpp{args.vpp}' if args.vpp > 1 else ''}{' ZeRO-1' if args.zero else ''}, "
          f"{args.dtype}, h={args.hidden}, {args.layers} layers, s={args.seq}, {args.microbatches} microbatches, "
          f"buckets of {args.bucket_mb} MiB, CPU gloo (torch {torch.__version__})\n")
    print("| rank | stage | buckets posted | … during the last backward | block backwards after the first post | "
          "block forwards under the param gathers | step s (overlap on / off) |")
    print("|---|---|---|---|---|---|---|")
    for r, (a, b) in enumerate(zip(on, off)):
        print(f"| {r} | {a['pp_rank']} | {a['posted']} | {a['in_last_backward']} | {a['backward_after_first_post']} | "
              f"{a['forward_under_gathers'] if args.zero else '—'} | {a['step_s']:.3f} / {b['step_s']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
