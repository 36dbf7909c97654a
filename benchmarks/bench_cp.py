"""Context parallelism: activation memory per rank, cp traffic and step time, measured against the planner.

    python benchmarks/bench_cp.py [--seqs 1024 4096] [--cps 1 2] [--layers 2] [--hidden 128] [--steps 3]

Each row runs real optimizer steps of the same model and data at one (sequence length, cp) on
forked gloo ranks, one thread each (so cp2 uses two cores where cp1 uses one — compare the per-rank
columns). Measured per rank:
  - bytes one microbatch's forward saves for backward (saved-tensor hooks, profile/activations.py)
    next to the planner's activation bytes per microbatch (profile/planner.py);
  - the cp payload per step counted by the comm module (all-gathered keys/values forward, their
    reduce-scattered gradients backward) next to the planner's wire bytes ÷ (cp−1)/cp — the ratio
    must be 1.00 (no hidden traffic);
  - median step time, tokens/s of the whole job and per rank.
The losses of every cp equal cp1's (printed), since cp changes where tokens are, not what is computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig, RunConfig  # noqa: E402
from scaletrain.config.validate import resolve_model  # noqa: E402
from scaletrain.distributed import ParallelDims  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.nn import init_parameters  # noqa: E402
from scaletrain.parallel.context_parallel import shard_microbatch  # noqa: E402
from scaletrain.parallel.parallelize import parallelize  # noqa: E402
from scaletrain.profile.activations import saved_activation_bytes  # noqa: E402
from scaletrain.profile.planner import plan  # noqa: E402
from scaletrain.stages.pretrain.objective import LanguageModelingObjective  # noqa: E402
from scaletrain.trainer.optimizer import build_optimizer  # noqa: E402
from scaletrain.trainer.precision import Precision  # noqa: E402
from scaletrain.trainer.step import train_step  # noqa: E402

from dist_harness import run_ranks  # noqa: E402


def _config(args, seq: int, cp: int) -> RunConfig:
    m = resolve_model(ModelConfig(vocab_size=512, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                  num_kv_heads=4, ffn_hidden_size=4 * args.hidden), tokenizer_vocab=None, tp=1,
                      seq_length=seq)
    cfg = dataclasses.replace(RunConfig(), model=m, parallel=ParallelConfig(cp=cp))
    return dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="float32"),
                               train=dataclasses.replace(cfg.train, micro_batch_size=1, global_batch_size=1,
                                                         seq_length=seq))


def _rank(rank: int, world: int, args, seq: int) -> dict:
    torch.set_num_threads(1)
    cfg = _config(args, seq, world)
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    model = parallelize(build_model(cfg.model, tp_size=1), dims, cfg.parallel)
    init_parameters(model, 0, 0, 1)
    opt = build_optimizer(model, OptimConfig(lr=1e-3), torch.device("cpu"), dims)
    objective = LanguageModelingObjective(dims.tp_comm)
    ids = torch.randint(0, 512, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    mb = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(1, seq)}

    def forward():
        out, loss_fn = objective.forward_step(shard_microbatch(mb, dims.comm("cp")), model)
        return loss_fn(out)[0]

    saved = saved_activation_bytes(forward, list(model.parameters()))[1]
    precision = Precision(torch.float32, None, "cpu", "bench")
    times, losses = [], []
    for i in range(args.steps + 1):  # the first step warms up and is left out
        dims.comm("cp").stats.reset()
        start = time.perf_counter()
        r = train_step(model, opt, objective, [mb], lr=1e-3, clip_grad=1.0, precision=precision,
                       device=torch.device("cpu"), dims=dims)
        if i:
            times.append(time.perf_counter() - start)
        losses.append(r.loss)
    stats = dims.comm("cp").stats
    payload = stats.bytes.get("all_gather", 0) + stats.bytes.get("reduce_scatter", 0)
    return {"saved": saved, "step_s": statistics.median(times), "losses": losses, "cp_payload": payload}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--block", type=int, default=0, help="blockwise attention block (default: nn.blockwise_attention.BLOCK)")
    args = ap.parse_args()
    if args.block:  # forked ranks inherit it
        import scaletrain.nn.blockwise_attention as bw

        bw.BLOCK = args.block
    print(f"# Context parallelism on CPU: {args.layers} layers, h={args.hidden}, 8 heads / 4 kv heads, "
          f"b=1, fp32, one thread per rank, median of {args.steps} steps\n")
    print("| seq | cp | act/rank MiB (measured) | act/rank MiB (planned) | cp payload MiB | planned | ratio "
          "| step s | tok/s | tok/s/rank | loss step 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for seq in args.seqs:
        base_losses = None
        for cp in args.cps:
            ranks = run_ranks(cp, _rank, args, seq, timeout=1800)
            r = ranks[0]
            p = plan(_config(args, seq, cp), cp, compute_dtype="float32")
            planned_act = p.stages[0].activation_bytes_per_microbatch
            planned_cp = p.comm_bytes_per_step.get("cp", 0) / ((cp - 1) / cp) if cp > 1 else 0
            ratio = r["cp_payload"] / planned_cp if planned_cp else float("nan")
            if cp > 1:
                ok &= abs(ratio - 1) < 0.005
            step = max(x["step_s"] for x in ranks)
            base_losses = base_losses or r["losses"]
            ok &= all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(r["losses"], base_losses))
            mib = 2**20
            print(f"| {seq} | {cp} | {r['saved'] / mib:.1f} | {planned_act / mib:.1f} | {r['cp_payload'] / mib:.1f} | "
                  f"{planned_cp / mib:.1f} | {ratio:.2f} | {step:.3f} | {seq / step:,.0f} | {seq / step / cp:,.0f} | "
                  f"{r['losses'][0]:.5f} |")
    print(f"\ncp traffic = planned, losses equal across cp: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
