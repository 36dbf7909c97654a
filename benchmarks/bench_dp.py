"""Data parallelism and the distributed optimizer: memory, communication and checkpoint throughput.

    python benchmarks/bench_dp.py [--dp 2] [--hidden 256] [--layers 4]

One optimizer step of a Llama on forked gloo ranks, with the plain optimizer and with ZeRO-1:
  - optimizer-state bytes per rank (AdamW moments + fp32 main shards) next to the unsharded total ÷ dp
    (ratio target ≤ 1.05);
  - bytes each rank puts on the wire for dp (ring all-reduce: 2(dp−1)/dp · payload; ZeRO's
    reduce-scatter + all-gather: (dp−1)/dp each) next to the ring minimum 2(dp−1)/dp · gradient bytes
    (ratio target ≤ 1.05; the loss, token count and grad-norm scalars ride along);
  - checkpoint save and load throughput (MB/s of the tensors written) next to a plain `torch.save` /
    `torch.load` of the same state dict on the same disk, single process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from scaletrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from scaletrain.config.validate import resolve_model  # noqa: E402
from scaletrain.distributed import ParallelDims  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.nn import init_parameters  # noqa: E402
from scaletrain.parallel.parallelize import parallelize  # noqa: E402
from scaletrain.stages.pretrain.objective import LanguageModelingObjective  # noqa: E402
from scaletrain.trainer.memory import memory_report  # noqa: E402
from scaletrain.trainer.optimizer import build_optimizer  # noqa: E402
from scaletrain.trainer.precision import Precision  # noqa: E402
from scaletrain.trainer.step import train_step  # noqa: E402

from dist_harness import run_ranks  # noqa: E402


def _batches(cfg: ModelConfig, n: int, b: int = 2, s: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        t = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
        out.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(b, s)})
    return out


def _step(rank: int, world: int, cfg: ModelConfig, zero: bool) -> dict:
    pcfg = ParallelConfig()
    dims = ParallelDims.from_config(pcfg, world, rank)
    model = parallelize(build_model(cfg), dims, pcfg, shard_optimizer=zero)
    init_parameters(model, 0)
    opt = build_optimizer(model, OptimConfig(distributed=zero), torch.device("cpu"), dims)
    mbs = _batches(cfg, 2)
    for _ in range(2):  # the second step is measured (the first creates the optimizer state)
        dims.comm("dp").stats.reset()
        train_step(model, opt, LanguageModelingObjective(), mbs, lr=1e-3, clip_grad=1.0,
                   precision=Precision(torch.float32, None, "cpu", "bench"), device=torch.device("cpu"), dims=dims)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"bytes": dict(dims.comm("dp").stats.bytes), "memory": memory_report(model, opt, torch.device("cpu")),
            "grad_bytes": grad_bytes}


def _checkpoint_throughput(cfg: ModelConfig, work: Path) -> dict:
    model = build_model(cfg)
    init_parameters(model, 0)
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"), ParallelDims.single())
    train_step(model, opt, LanguageModelingObjective(), _batches(cfg, 1), lr=1e-3, clip_grad=1.0,
               precision=Precision(torch.float32, None, "cpu", "bench"), device=torch.device("cpu"),
               dims=ParallelDims.single())
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    rows = {}
    t0 = time.perf_counter()
    path = save_checkpoint(work / "ckpt", 1, model, opt, {"consumed_samples": 0}, dims=ParallelDims.single())
    rows["scaletrain save"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_checkpoint(path, model, opt, dims=ParallelDims.single())
    rows["scaletrain load"] = time.perf_counter() - t0
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    t0 = time.perf_counter()
    with open(work / "plain.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # our save fsyncs too
    rows["torch.save"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.load(work / "plain.pt", weights_only=True)
    rows["torch.load"] = time.perf_counter() - t0
    return {"bytes": nbytes, "seconds": rows}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    dp = args.dp
    cfg = resolve_model(ModelConfig(vocab_size=1024, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                    num_kv_heads=4), tokenizer_vocab=None, tp=1, seq_length=32)
    plain = run_ranks(dp, _step, cfg, False, timeout=300)
    zero = run_ranks(dp, _step, cfg, True, timeout=300)
    grad_bytes = plain[0]["grad_bytes"]
    ring = 2 * (dp - 1) / dp * grad_bytes
    print(f"# data parallelism: dp={dp}, {args.layers} layers, h={args.hidden}, fp32 "
          f"({grad_bytes / 2**20:.1f} MiB of gradients); load average {os.getloadavg()[0]:.2f}\n")
    unsharded = plain[0]["memory"]["optimizer"] + grad_bytes  # AdamW moments + an fp32 master copy
    print("| optimizer | optimizer state per rank (MiB) | unsharded total ÷ dp (MiB) | ratio |")
    print("|---|---|---|---|")
    ok = True
    for name, res, ideal in (("AdamW (replicated)", plain, None), ("ZeRO-1", zero, unsharded / dp)):
        per_rank = max(r["memory"]["optimizer"] for r in res)
        if ideal is None:
            print(f"| {name} | {per_rank / 2**20:,.2f} | — | — |")
        else:
            ratio = per_rank / ideal
            ok &= ratio <= 1.05
            print(f"| {name} | {per_rank / 2**20:,.2f} | {ideal / 2**20:,.2f} | {ratio:.3f} |")
    print("\n| optimizer | dp op | payload bytes | wire bytes per rank | ring minimum 2(dp−1)/dp·grads | ratio |")
    print("|---|---|---|---|---|---|")
    for name, res in (("AdamW", plain), ("ZeRO-1", zero)):
        wire = 0.0
        for op, payload in sorted(res[0]["bytes"].items()):
            factor = 2 * (dp - 1) / dp if op == "all_reduce" else (dp - 1) / dp
            wire += factor * payload
            print(f"| {name} | {op} | {payload:,} | {factor * payload:,.0f} | | |")
        ok &= wire / ring <= 1.05
        print(f"| {name} | total | | {wire:,.0f} | {ring:,.0f} | {wire / ring:.3f} |")
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        ck = _checkpoint_throughput(cfg, Path(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
    mb = ck["bytes"] / 1e6
    print(f"\n| checkpoint ({mb:.1f} MB of model + optimizer tensors, same disk) | seconds | MB/s |")
    print("|---|---|---|")
    for name, sec in ck["seconds"].items():
        print(f"| {name} | {sec:.3f} | {mb / sec:,.0f} |")
    print(f"\nZeRO-1 state ≤ 1.05 × total/dp and dp traffic ≤ 1.05 × ring minimum: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
