"""Tensor-parallel communication volume per step, measured through the comm module, against theory.

    python benchmarks/bench_tp_comm.py [--tp 2] [--layers 4] [--seq 64] [--hidden 128] [--dtype bfloat16]

Every collective goes through `scaletrain.distributed.comm.Comm`, which counts the payload of each
call (the full tensor an op moves: the all-reduced tensor, the gathered output, the
reduce-scattered input). One optimizer step of the real model runs on forked gloo ranks; the
table compares the measured payload with Megatron TP's minimum:

  per layer and microbatch, B = b·s·h·bytes:
    without SP  2 all-reduces of B in forward (attention and MLP outputs), 2 in backward (their inputs)
    with SP     2 all-gathers + 2 reduce-scatters of B in forward, the mirror pairs in backward
  once per microbatch: embedding output (1 B fwd; with SP + 1 B bwd), head input (1 B bwd; with SP
    + 1 B fwd), vocab-parallel cross-entropy: max and (sum-exp, label logit) over b·s tokens
  once per step: the sequence-parallel norm-weight gradients, the global grad-norm scalar.

In a bf16 run (--dtype bfloat16: bf16 weights and activations, precision.params = 'bf16') B counts 2 bytes
per element: the activations, their gradients and the SP collectives travel in bf16; the loss's statistics
and the norm-weight gradients (fp32 main grads) stay 4 bytes.

Ring algorithms put 2(n-1)/n · payload (all-reduce) or (n-1)/n · payload (all-gather,
reduce-scatter) on the wire per rank; that factor is the same on both sides of the ratio.
The ratio must be 1.00: no hidden extra communication.
"""

from __future__ import annotations

import argparse
import sys
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
from scaletrain.stages.pretrain.objective import LanguageModelingObjective  # noqa: E402
from scaletrain.trainer.optimizer import build_optimizer  # noqa: E402
from scaletrain.trainer.precision import Precision  # noqa: E402
from scaletrain.trainer.step import train_step  # noqa: E402

from dist_harness import run_ranks  # noqa: E402


def _one_step(rank: int, world: int, cfg: ModelConfig, sp: bool, b: int, s: int, microbatches: int,
              dtype: str = "float32") -> dict:
    pcfg = ParallelConfig(tp=world, sequence_parallel=sp)
    dims = ParallelDims.from_config(pcfg, world, rank)
    bf16 = dtype == "bfloat16"
    precision = Precision(torch.bfloat16, torch.bfloat16, "cpu", "bench") if bf16 else \
        Precision(torch.float32, None, "cpu", "bench")
    model = parallelize(build_model(cfg, tp_size=world, dtype=precision.param_dtype), dims, pcfg)
    init_parameters(model, 0, dims.tp_rank, world)
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"), dims)
    g = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(microbatches):
        t = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
        mbs.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(b, s)})
    dims.tp_comm.stats.reset()
    train_step(model, opt, LanguageModelingObjective(dims.tp_comm), mbs, lr=1e-3, clip_grad=1.0,
               precision=precision, device=torch.device("cpu"), dims=dims)
    return {"bytes": dict(dims.tp_comm.stats.bytes), "calls": dict(dims.tp_comm.stats.calls)}


NORM_BYTES = 8  # the global grad norm's partial sum of squares, accumulated in float64


def theory(cfg: ModelConfig, sp: bool, b: int, s: int, microbatches: int, elt: int = 4) -> dict[str, int]:
    """Minimum payload bytes per op for one step (see the module docstring); `elt`: bytes of an activation
    element (4 float32, 2 bf16); the loss's statistics and gradients of the weights are float32 either way."""
    act = b * s * cfg.hidden_size * elt
    tokens = b * s
    ce = (tokens + 2 * tokens) * 4  # all-reduce(max) + all-reduce(stacked sum-exp, label logit), float32
    out: dict[str, int] = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
    if sp:
        per_mb_ag = cfg.num_layers * 4 * act + act + act  # layers: 2 fwd + 2 bwd; embed bwd; head fwd
        per_mb_rs = cfg.num_layers * 4 * act + act + act  # layers: 2 fwd + 2 bwd; embed fwd; head bwd
        out["all_gather"] = microbatches * per_mb_ag
        out["reduce_scatter"] = microbatches * per_mb_rs
        out["all_reduce"] = microbatches * ce + (2 * cfg.num_layers + 1) * cfg.hidden_size * 4 + NORM_BYTES
    else:
        out["all_reduce"] = microbatches * (cfg.num_layers * 4 * act + 2 * act + ce) + NORM_BYTES
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="bfloat16: bf16 weights and activations (the default layout of bf16 runs)")
    args = ap.parse_args()
    cfg = resolve_model(ModelConfig(vocab_size=512, hidden_size=args.hidden, num_layers=args.layers,
                                    num_heads=8, num_kv_heads=4, ffn_hidden_size=4 * args.hidden),
                        tokenizer_vocab=None, tp=1, seq_length=args.seq)
    print(f"# TP communication per step: tp={args.tp}, {args.layers} layers, h={args.hidden}, "
          f"b={args.micro_batch}, s={args.seq}, {args.microbatches} microbatches, {args.dtype}\n")
    print("| layout | op | calls | measured bytes | theoretical bytes | ratio | wire bytes/rank (ring) |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    n = args.tp
    for sp in (False, True):
        ranks = run_ranks(args.tp, _one_step, cfg, sp, args.micro_batch, args.seq, args.microbatches, args.dtype,
                          timeout=300)
        measured = ranks[0]
        assert all(r["bytes"] == measured["bytes"] for r in ranks), "ranks disagree on traffic"
        want = theory(cfg, sp, args.micro_batch, args.seq, args.microbatches, 2 if args.dtype == "bfloat16" else 4)
        total_m = total_t = 0
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            m, t = measured["bytes"].get(op, 0), want[op]
            if m == 0 and t == 0:
                continue
            factor = 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n
            ratio = m / t if t else float("inf")
            ok &= abs(ratio - 1.0) < 0.005
            total_m, total_t = total_m + m, total_t + t
            print(f"| {'SP' if sp else 'TP'} | {op} | {measured['calls'].get(op, 0)} | {m:,} | {t:,} | "
                  f"{ratio:.2f} | {factor * m:,.0f} |")
        print(f"| {'SP' if sp else 'TP'} | total | | {total_m:,} | {total_t:,} | {total_m / total_t:.2f} | |")
    print(f"\nmeasured = theoretical minimum on every op: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
