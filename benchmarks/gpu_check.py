"""GPU check (see gpu_check.sh): fused-kernel parity on the device; the Transformer Engine backend's
tests (names/shapes, forward parity with the torch backend, checkpoint round trip, FP8 steps); a
200-step FP8-vs-BF16 loss comparison on a small model; a throughput/MFU sweep of Llama-3-style 1B and
3B shapes — torch backend with and without the fused kernels, te backend in bf16 and in FP8. One table
at the end, with the issue's targets (≥ 55% bf16 MFU on 3B at seq 8192, FP8 ≥ 1.3× bf16 tokens/s, FP8
loss within 1% of bf16 after 200 steps) checked against the measured numbers.

Throughput comes from `scaletrain profile` (measured mode, tp=1 on one GPU, PaLM FLOP convention).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def prepare_data(work: Path) -> tuple[str, str]:
    tok, prefix = work / "tokenizer", work / "kjv"
    for cmd in (["scaletrain", "data", "tokenizer", "--input", "builtin:kjv", "--vocab-size", "2048", "--output", str(tok)],
                ["scaletrain", "data", "preprocess", "--input", "builtin:kjv", "--tokenizer", str(tok),
                 "--output-prefix", str(prefix), "--workers", "8"]):
        r = sh(cmd, 300)
        if r.returncode:
            raise SystemExit(f"gpu_check: data preparation failed:\n{r.stderr[-2000:]}")
    return str(tok), str(prefix)


VARIANTS = {  # name: extra --set items
    "torch": ["parallel.backend=torch", "parallel.kernels=[]"],
    "torch+fused": ["parallel.backend=torch", 'parallel.kernels=["all"]'],
    "te-bf16": ["parallel.backend=te", "parallel.kernels=[]"],
    "te-fp8": ["parallel.backend=te", "parallel.kernels=[]", "precision.fp8=true", "precision.fp8_recipe=current"],
}


def throughput(config: str, seq: int, variant: str, tok: str, prefix: str, work: Path, steps: int) -> dict:
    out = work / f"{Path(config).stem}-{seq}-{variant}.json"
    sets = [f"data.tokenizer={tok}", f'data.prefixes=["{prefix}"]', f"train.seq_length={seq}",
            "train.micro_batch_size=1", "train.global_batch_size=4", "precision.dtype=bfloat16",
            "model.vocab_size=128256", *VARIANTS[variant]]
    cmd = ["scaletrain", "profile", "--config", config, "--steps", str(steps), "--warmup", "3", "--phase-steps", "2",
           "--gpu-memory-gb", "141", "--json", str(out)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    r = sh(cmd, 600)
    row = {"shape": Path(config).stem, "seq": seq, "variant": variant, "wall_s": round(time.time() - t0, 1)}
    if r.returncode:
        row["error"] = (r.stderr or r.stdout)[-400:].strip().replace("\n", " | ")
        return row
    m = json.loads(out.read_text())["measured"]
    row.update(tok_s_gpu=m["tokens_per_s_per_gpu"], tflops=m["tflops_per_gpu"], mfu=m["mfu"],
               mem_gb=m["peak_mem_gb"])
    return row


def loss_run(fp8: bool, tok: str, prefix: str, work: Path, steps: int) -> dict:
    """A small Llama (≈ 60 M parameters, seq 1024) for `steps` steps on the te backend, bf16 or FP8."""
    run_dir = work / f"loss-{'fp8' if fp8 else 'bf16'}"
    sets = [f"data.tokenizer={tok}", f'data.prefixes=["{prefix}"]', f"train.run_dir={run_dir}",
            f"train.steps={steps}", "train.seq_length=1024", "train.global_batch_size=16", "train.micro_batch_size=16",
            "model.hidden_size=768", "model.num_layers=8", "model.num_heads=12", "model.num_kv_heads=4",
            "model.ffn_hidden_size=2048", "optim.lr=1e-3", "optim.warmup_steps=20", "train.eval_interval=0",
            "checkpoint.interval=0", "checkpoint.save_at_end=false", "logging.tensorboard=false",
            "logging.interval=50", "precision.dtype=bfloat16", "parallel.backend=te", "train.deterministic=false",
            f"precision.fp8={'true' if fp8 else 'false'}"]
    cmd = ["scaletrain", "train", "--config", "configs/tiny.toml"]
    for s in sets:
        cmd += ["--set", s]
    r = sh(cmd, 600)
    if r.returncode:
        return {"error": (r.stderr or r.stdout)[-400:].strip().replace("\n", " | ")}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tail = rows[-20:]  # the mean of the last 20 steps: one step's loss is noisy
    return {"loss": sum(x["loss"] for x in tail) / len(tail), "tok_s": sum(x["tokens_per_s"] for x in tail) / len(tail)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--loss-steps", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="1B at seq 4096 only, 50 loss steps")
    p.add_argument("--full", action="store_true", help="also seq 4096 for both shapes")
    args = p.parse_args()
    import torch

    from scaletrain.nn.backend import te_importable

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name(0)}, "
          f"python {platform.python_version()}", flush=True)
    te_ok, te_detail = te_importable()
    print(f"transformer_engine: {te_detail if te_ok else 'NOT AVAILABLE — ' + te_detail}", flush=True)
    failures = []
    results: dict[str, str] = {}
    for name, test in (("fused-kernel parity (tests/test_kernels.py)", "tests/test_kernels.py"),
                       ("te backend: names/shapes, parity, checkpoint, FP8 steps (tests/test_te_backend.py)",
                        "tests/test_te_backend.py"),
                       ("context-parallel attention kernels on CUDA (tests/test_context_parallel.py -k cuda)",
                        "tests/test_context_parallel.py::test_cuda_cp_attention_paths_equal_sdpa")):
        r = sh([sys.executable, "-m", "pytest", "-q", "-rs", test], 600)
        summary = (r.stdout.strip().splitlines() or ["no output"])[-1]
        results[name] = ("pass" if r.returncode == 0 else "FAIL") + f" ({summary})"
        if r.returncode or (test.endswith("te_backend.py") and not te_ok):  # te tests skipped: not verified
            failures.append(name)
            print(r.stdout[-3000:], r.stderr[-2000:])
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    tok, prefix = prepare_data(work)
    loss_steps = 50 if args.quick else args.loss_steps
    losses = {"bf16": loss_run(False, tok, prefix, work, loss_steps), "fp8": loss_run(True, tok, prefix, work, loss_steps)}
    shapes = [("configs/llama3_1b.toml", 4096)] if args.quick else [
        ("configs/llama3_1b.toml", 8192), ("configs/llama3_3b.toml", 8192)]
    if args.full:
        shapes += [("configs/llama3_1b.toml", 4096), ("configs/llama3_3b.toml", 4096)]
    rows = [throughput(c, s, v, tok, prefix, work, args.steps) for c, s in shapes for v in VARIANTS]
    failures += [f"{r['shape']} seq {r['seq']} {r['variant']}" for r in rows if "error" in r]
    failures += [f"{k} loss run" for k, v in losses.items() if "error" in v]

    print("\n=== gpu_check results ===")
    for name, res in results.items():
        print(f"{name}: {res}")
    if all("error" not in v for v in losses.values()):
        rel = losses["fp8"]["loss"] / losses["bf16"]["loss"] - 1
        print(f"FP8 vs BF16 after {loss_steps} steps (te backend, mean of the last 20): bf16 {losses['bf16']['loss']:.4f}, "
              f"fp8 {losses['fp8']['loss']:.4f} ({100 * rel:+.2f}%; target within 1%: {'met' if abs(rel) <= 0.01 else 'NOT met'})")
    else:
        print(f"FP8 vs BF16 loss: ERROR {losses}")
    print(f"{'shape':<10} {'seq':>5} {'variant':>11} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>7} {'wall s':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<10} {r['seq']:>5} {r['variant']:>11}  ERROR: {r['error'][:200]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—"
        print(f"{r['shape']:<10} {r['seq']:>5} {r['variant']:>11} {r['tok_s_gpu']:>10,.0f} {r['tflops']:>8.1f} {mfu:>6} "
              f"{r['mem_gb']:>7.1f} {r['wall_s']:>7}")
    by = {(r["shape"], r["seq"], r["variant"]): r for r in rows if "error" not in r}
    for shape, seq in shapes:
        bf, f8 = by.get((Path(shape).stem, seq, "te-bf16")), by.get((Path(shape).stem, seq, "te-fp8"))
        if bf and f8:
            ratio = f8["tok_s_gpu"] / bf["tok_s_gpu"]
            print(f"{Path(shape).stem} seq {seq}: FP8 / BF16 tokens/s = {ratio:.2f}× (target ≥ 1.3×: "
                  f"{'met' if ratio >= 1.3 else 'NOT met'})")
    best = max((r for r in rows if "error" not in r and r["shape"] == "llama3_3b" and r["seq"] == 8192
                and "fp8" not in r["variant"]), key=lambda r: r["mfu"] or 0, default=None)
    if best is not None and best["mfu"] is not None:
        print(f"llama3_3b seq 8192 best bf16 MFU: {100 * best['mfu']:.1f}% ({best['variant']}; target ≥ 55%: "
              f"{'met' if best['mfu'] >= 0.55 else 'NOT met'})")
    if failures:
        print("gpu_check: FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
