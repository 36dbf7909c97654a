"""Expert-parallel dispatch/combine traffic per step against theory, and CPU throughput dense vs MoE.

    python benchmarks/bench_moe_comm.py [--ep 2 4] [--layers 4] [--seq 64] [--hidden 64]

Traffic: one optimizer step of a MoE Llama (every layer a MoE layer, E = 8 experts, top-2, dropless) on
forked gloo ranks with parallel.ep = world (dp = ep). Every token exchange goes through
`scaletrain.distributed.comm.Comm.all_to_all`, which counts the payload it is handed (the rows a rank sends,
its own share included). Theory, per MoE layer and microbatch, with N = b·s tokens on each of the ep ranks
and B = N·k·h·bytes (every routed assignment's hidden vector once), summed over the ep ranks:
    forward   dispatch ep·B + combine ep·B;   backward   the two reversed      → 4·ep·B
    counts    one all-to-all of the E per-expert counts (int64) per rank      → ep·8E bytes
(A single rank sends 2·N·k rows — its dispatch, and the combine's backward — plus 2·R rows, R the
assignments its experts received: per rank the payload follows the routing's balance, the total does not.)
The ratio must be 1.00: the dispatcher sends each assignment exactly once each way, with no padding.

Throughput: single process, the same step (forward, backward, AdamW) on a dense model and on a MoE model
with the same active parameters per token (dense SwiGLU width F; MoE: top-2 of 8 experts of width F/3 plus a
shared expert of width F/3 — 2·F/3 + F/3 = F — and an E×h router), float32, tokens per second (median).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from scaletrain.config.moe import MoEConfig  # noqa: E402
from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from scaletrain.distributed import ParallelDims  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.nn import init_parameters  # noqa: E402
from scaletrain.parallel.parallelize import parallelize  # noqa: E402
from scaletrain.stages.pretrain.objective import LanguageModelingObjective  # noqa: E402
from scaletrain.trainer.optimizer import build_optimizer  # noqa: E402
from scaletrain.trainer.precision import Precision  # noqa: E402
from scaletrain.trainer.step import train_step  # noqa: E402

from dist_harness import run_ranks  # noqa: E402

EXPERTS, TOP_K = 8, 2


def _cfg(layers: int, hidden: int, ffn: int, moe: bool) -> ModelConfig:
    m = MoEConfig(num_experts=EXPERTS, top_k=TOP_K, expert_ffn_hidden_size=ffn // 3, shared_ffn_hidden_size=ffn // 3,
                  aux_loss_coef=0.01) if moe else MoEConfig()
    return ModelConfig(vocab_size=512, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                       head_dim=hidden // 4, ffn_hidden_size=ffn, max_position_embeddings=1024, moe=m)


def _batches(cfg: ModelConfig, b: int, s: int, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
        out.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(b, s)})
    return out


def _step(model, opt, dims, mbs) -> None:
    train_step(model, opt, LanguageModelingObjective(dims.tp_comm), mbs, lr=1e-3, clip_grad=1.0,
               precision=Precision(torch.float32, None, "cpu", "bench"), device=torch.device("cpu"), dims=dims)


def _traffic_rank(rank: int, world: int, cfg: ModelConfig, b: int, s: int, microbatches: int) -> dict:
    pcfg = ParallelConfig(ep=world)
    dims = ParallelDims.from_config(pcfg, world, rank)
    with torch.device("meta"):
        model = build_model(cfg)
    model = parallelize(model, dims, pcfg)
    init_parameters(model, 0)
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"), dims)
    ep = dims.comm("ep")
    ep.stats.reset()
    _step(model, opt, dims, _batches(cfg, b, s, microbatches, seed=rank))
    return {"bytes": dict(ep.stats.bytes), "calls": dict(ep.stats.calls)}


def traffic(ep: int, layers: int, hidden: int, b: int, s: int, microbatches: int) -> list[tuple]:
    cfg = _cfg(layers, hidden, 3 * hidden, moe=True)
    ranks = run_ranks(ep, _traffic_rank, cfg, b, s, microbatches, timeout=300)
    assignments = b * s * TOP_K
    theory = {"all_to_all": ep * layers * microbatches * 4 * assignments * hidden * 4,
              "all_to_all_counts": ep * layers * microbatches * EXPERTS * 8}
    rows = []
    for op, want in theory.items():
        got = [r["bytes"].get(op, 0) for r in ranks]
        rows.append((ep, op, ranks[0]["calls"].get(op, 0), sum(got), want, sum(got) / want, min(got), max(got)))
    return rows


def throughput(layers: int, hidden: int, b: int, s: int, steps: int) -> list[tuple]:
    dims = ParallelDims.single()
    rows = []
    for moe in (False, True):
        cfg = _cfg(layers, hidden, 3 * hidden, moe)
        model = build_model(cfg)
        init_parameters(model, 0)
        opt = build_optimizer(model, OptimConfig(), torch.device("cpu"), dims)
        mbs = _batches(cfg, b, s, 1, seed=0)
        _step(model, opt, dims, mbs)  # warm-up
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            _step(model, opt, dims, mbs)
            times.append(time.perf_counter() - t0)
        total = sum(p.numel() for p in model.parameters())
        idle = (EXPERTS - TOP_K) * 3 * hidden * (hidden * 3 // 3) * layers if moe else 0  # experts a token skips
        matmul = total - cfg.vocab_size * hidden - sum(p.numel() for p in model.parameters() if p.ndim == 1) - idle
        rows.append(("MoE 8×top-2 + shared" if moe else "dense SwiGLU", total, matmul, b * s / statistics.median(times)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| ep | op | calls/rank | measured bytes (all ranks) | theoretical bytes | ratio | per rank min | max |")
    print("|---|---|---|---|---|---|---|---|")
    for ep in args.ep:
        for row in traffic(ep, args.layers, args.hidden, 2, args.seq, 2):
            print("| {} | {} | {} | {:,} | {:,} | {:.2f} | {:,} | {:,} |".format(*row))
    print()
    print("| model | parameters | active matmul parameters | tokens/s (1 thread, median) |")
    print("|---|---|---|---|")
    for name, total, active, tps in throughput(args.layers, 2 * args.hidden, 4, 2 * args.seq, args.steps):
        print(f"| {name} | {total:,} | {active:,} | {tps:,.0f} |")


if __name__ == "__main__":
    main()
