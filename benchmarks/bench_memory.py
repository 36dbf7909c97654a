"""Memory of the precision and recomputation modes (issue 25), planned and measured on CPU, and the layouts the
planner gives for Llama-3-8B at seq 8192 on 8 × H100 80 GB.

    python benchmarks/bench_memory.py [--hidden 256] [--layers 4] [--seq 512] [--vocab 8192] [--steps 200]

Part 1, one training step of a small Llama per mode (float32; bf16 weights with fp32 main grads and master
weights) × (no / selective / full recomputation): static bytes (weights, gradient buckets, optimizer state:
trainer/memory.py) and the peak the step allocates on top (torch profiler's allocation events:
profile/peak.py), against the planner's per-rank total. Part 2: the loss's peak for bf16 logits of the whole
sequence, chunked (now) against float32 for the whole sequence (before). Part 3: bf16 weights against float32
over --steps steps of the same data (loss). Part 4: the Llama-3-8B plans.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from scaletrain.parallel.parallelize import parallelize  # noqa: E402
from scaletrain.profile.peak import peak_allocated_bytes  # noqa: E402
from scaletrain.profile.planner import plan  # noqa: E402
from scaletrain.stages.pretrain.objective import LanguageModelingObjective  # noqa: E402
from scaletrain.trainer.memory import memory_report  # noqa: E402
from scaletrain.trainer.optimizer import build_optimizer  # noqa: E402
from scaletrain.trainer.precision import Precision  # noqa: E402
from scaletrain.trainer.step import train_step  # noqa: E402

CPU = torch.device("cpu")
MiB = 2**20
PRECISIONS = {"float32": Precision(torch.float32, None, "cpu", "bench"),
              "bf16 weights": Precision(torch.bfloat16, torch.bfloat16, "cpu", "bench")}
MODES = {"none": ParallelConfig(), "selective (all)": ParallelConfig(recompute="selective",
                                                                      recompute_modules=("core_attn", "mlp_act", "norm")),
         "full": ParallelConfig(recompute="full")}


def _run_cfg(m: ModelConfig, pcfg: ParallelConfig, dtype: str, micro: int, seq: int) -> RunConfig:
    cfg = dataclasses.replace(RunConfig(), model=m, parallel=pcfg)
    return dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype=dtype),
                               train=dataclasses.replace(cfg.train, micro_batch_size=micro, global_batch_size=micro,
                                                         seq_length=seq))


def _batch(m: ModelConfig, micro: int, seq: int, seed: int) -> list[dict]:
    t = torch.randint(0, m.vocab_size, (micro, seq + 1), generator=torch.Generator().manual_seed(seed))
    return [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(micro, seq)}]


def part1(m: ModelConfig, micro: int, seq: int) -> None:
    print("| precision | recompute | static MiB (measured / planned) | step peak MiB | total MiB measured | "
          "planned | ratio | step s |")
    print("|---|---|---|---|---|---|---|---|")
    dims = ParallelDims.single()
    for pname, precision in PRECISIONS.items():
        for mode, pcfg in MODES.items():
            model = parallelize(build_model(m, dtype=precision.param_dtype), dims, pcfg)
            init_parameters(model, 0)
            opt = build_optimizer(model, OptimConfig(), CPU, dims)

            def step(model=model, opt=opt, precision=precision):
                return train_step(model, opt, LanguageModelingObjective(), _batch(m, micro, seq, 0), lr=1e-3,
                                  clip_grad=1.0, precision=precision, device=CPU, dims=dims)

            step()
            t0 = time.perf_counter()
            step()
            seconds = time.perf_counter() - t0
            _, peak = peak_allocated_bytes(step)
            rep = memory_report(model, opt, CPU)
            static = rep["params"] + rep["grads"] + rep["optimizer"]
            st = plan(_run_cfg(m, pcfg, "float32" if pname == "float32" else "bfloat16", micro, seq), 1).stages[0]
            planned_static = st.weights_bytes + st.grads_bytes + st.optimizer_bytes
            print(f"| {pname} | {mode} | {static / MiB:.1f} / {planned_static / MiB:.1f} | {peak / MiB:.1f} | "
                  f"{(static + peak) / MiB:.1f} | {st.total_bytes / MiB:.1f} | {(static + peak) / st.total_bytes:.3f} | "
                  f"{seconds:.2f} |")


def part2(tokens: int, vocab: int) -> None:
    import torch.nn.functional as F

    from scaletrain.nn.loss import chunk_rows, cross_entropy_per_token

    logits = torch.randn(tokens, vocab, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(1))

    def chunked():
        cross_entropy_per_token(logits, labels).sum().backward()

    def whole():
        F.cross_entropy(logits.float(), labels, reduction="none").sum().backward()

    rows = []
    for name, fn in (("chunked (bf16 logits kept, fp32 per chunk)", chunked), ("fp32 whole sequence (before)", whole)):
        fn()
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        _, peak = peak_allocated_bytes(fn)
        rows.append((name, peak, seconds))
    print(f"\nloss of bf16 logits [{tokens}, {vocab}] (one fp32 copy = {tokens * vocab * 4 / MiB:.0f} MiB; "
          f"chunks of {chunk_rows(vocab)} tokens), forward + backward:\n")
    print("| loss | peak MiB | time s |\n|---|---|---|")
    for name, peak, seconds in rows:
        print(f"| {name} | {peak / MiB:.1f} | {seconds:.3f} |")


def part3(steps: int) -> None:
    from test_mixed_precision import BF16, FP32, _data, _train

    data = _data(steps, 2)
    a = torch.tensor(_train(0, 1, ParallelConfig(), FP32, data)["losses"])
    b = torch.tensor(_train(0, 1, ParallelConfig(), BF16, data)["losses"])
    rel = (b - a).abs() / a
    print(f"\nbf16 weights vs float32, {steps} steps (tiny Llama, bigram-chain data): loss {a[0]:.4f} → fp32 {a[-1]:.4f} / "
          f"bf16 {b[-1]:.4f}; per-step relative difference max {100 * rel.max():.2f}%, mean {100 * rel.mean():.2f}%, "
          f"last-50 means {100 * abs(b[-50:].mean() / a[-50:].mean() - 1):.3f}% apart")


def part4() -> None:
    from scaletrain.commands.profile import resolved_config

    print("\nLlama-3-8B, seq 8192, micro-batch 1, 8 × H100 80 GB (GiB per rank):\n")
    print("| layout | weights | grads | optimizer | activations | total | fits |\n|---|---|---|---|---|---|---|")
    for name, sets in (("tp1 dp8 ZeRO-1, bf16 weights, full recompute", ["parallel.recompute=full"]),
                       ("tp1 dp8 ZeRO-1, bf16 weights, selective (all modules)",
                        ["parallel.recompute=selective", 'parallel.recompute_modules=["core_attn","mlp_act","norm"]']),
                       ("tp1 dp8 ZeRO-1, bf16 weights, no recompute", []),
                       ("tp1 dp8 ZeRO-1, fp32 weights (autocast), full recompute",
                        ["parallel.recompute=full", "precision.params=fp32"])):
        cfg = resolved_config(str(REPO / "configs" / "llama3_8b.toml"),
                              ["train.seq_length=8192", "optim.distributed=true", *sets], 8)
        p = plan(cfg, 8, gpu_memory_gb=80)
        s = p.stages[0]
        g = 2**30
        print(f"| {name} | {s.weights_bytes / g:.2f} | {s.grads_bytes / g:.2f} | {s.optimizer_bytes / g:.2f} | "
              f"{s.activations_bytes / g:.2f} | {s.total_bytes / g:.2f} | {'yes' if p.fits else 'no'} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(2)
    m = resolve_model(ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                                  ffn_hidden_size=4 * args.hidden, vocab_size=args.vocab), tokenizer_vocab=None, tp=1,
                      seq_length=args.seq)
    print(f"# one training step, h={args.hidden}, {args.layers} layers, vocab {args.vocab}, b={args.micro_batch}, "
          f"s={args.seq}, CPU (torch {torch.__version__})\n")
    part1(m, args.micro_batch, args.seq)
    part2(args.micro_batch * args.seq * 4, 4 * args.vocab)
    part3(args.steps)
    part4()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
