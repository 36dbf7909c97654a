"""GPU check for a lent H100/H200 (gpu_check.sh installs the carried wheels and calls this): one table.

Every row runs in its own subprocess under its own timeout, inside a total time budget (default 390 s,
so that the command with its start-up and the wheel install ends inside 7 minutes on one H100 80GB);
a hang, crash or OOM is that row's 'timeout' / 'FAIL', never the end of the table. Rows, by priority:

  env         scaletrain's runtime requirements are all met here (benchmarks/gpu/wheels.py check --installed)
  kernels     tests/test_kernels.py on CUDA: the fused Triton kernels against their torch references
  attention   tests/test_context_parallel.py -k cuda: the attention paths on CUDA against SDPA
  te tests    tests/test_te_backend.py where Transformer Engine imports, else 'unavailable'
  data        a tokenizer and .bin/.idx from the bundled corpus (scaletrain data tokenizer/preprocess)
  throughput  Llama-3 1B (configs/llama3_1b.toml), torch backend, bf16: eager / fused kernels / compile /
              both, at seq 4096 then 8192 (`scaletrain profile`: tokens/s, TFLOP/s, MFU by PaLM's 6N+12LHQT,
              peak memory); micro-batch and recomputation chosen by the planner to fit the device's memory
  fp8         the same shape through every FP8 path that can run: Transformer Engine (te bf16 and te fp8
              rows) and torchao's float8 training (tensorwise and rowwise, compiled), else 'unavailable' rows
  loss        each throughput row's loss at its first and last step against the eager row's at the same
              shape (same seed, weights and data: bf16 rounding apart, they compute the same function)

    python benchmarks/gpu_check.py [--quick] [--budget-s 390] [--json results.json]
    python benchmarks/gpu_check.py --cpu-smoke      # the same rows on CPU with a tiny model (tests/test_gpu_check.py)

Exit status: 0 when no row failed or timed out ('unavailable' and rows left out for time are not
failures but are shown), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADROOM = 0.7  # of device memory for the planner's peak: it leaves out allocator slack, workspaces, autocast copies
STEP_1_TOL, LAST_STEP_TOL = 0.01, 0.03  # loss agreement with the eager row (relative)


@dataclass
class Row:
    name: str
    cmd: list[str] | None  # None: decided without running (unavailable, does not fit)
    timeout_s: float
    group: str = "test"  # test | data | throughput
    required: bool = True  # a failure fails the check
    status: str = "left out"  # pass | FAIL | timeout | unavailable | left out (time budget) | skipped
    detail: str = ""
    wall_s: float = 0.0
    json_out: Path | None = None
    seq: int = 0
    variant: str = ""
    measured: dict = field(default_factory=dict)


def run_command(cmd: list[str], timeout_s: float, env: dict[str, str]) -> tuple[int | None, str]:
    """(exit code, or None when it ran past timeout_s; the last 4 kB of its output). The command runs in a
    session of its own and the whole process group is killed at the timeout, grandchildren included (a
    torchrun or pytest worker must not outlive its row)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out[-4000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, (out or "")[-4000:]


def child_env(smoke: bool) -> dict[str, str]:
    paths = [str(REPO), str(REPO / "kernels")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # the fused kernels through Triton's interpreter on CPU
    return env


@dataclass(frozen=True)
class Shape:
    """What differs between the GPU run and the CPU smoke run; everything else is the same code path."""

    config: str
    seqs: tuple[int, ...]
    sets: tuple[str, ...]  # --set items on top of the config
    tokenizer_vocab: int
    steps: int
    warmup: int
    tokens_per_step: int  # at least this many tokens per optimizer step (microbatches added)
    micro_batches: tuple[int, ...]  # micro-batch sizes to try, largest first
    kernel_tests: tuple[str, ...]  # pytest selection of tests/test_kernels.py (all on a GPU)


GPU = Shape("configs/llama3_1b.toml", (4096, 8192), ("model.vocab_size=128256",), 2048, 8, 3, 16384, (4, 2, 1), ())
# Tiny, and one sequence per step: on CPU the fused kernels run through Triton's interpreter (~10 tokens/s).
SMOKE = Shape("configs/tiny.toml", (16, 32), ("model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
              "model.num_kv_heads=2", "model.ffn_hidden_size=128", "model.vocab_size=512"), 512, 3, 1, 16, (1,),
              ("-k", "rmsnorm or swiglu"))
VARIANTS = {  # name: --set items (torch backend, bf16)
    "eager": ("parallel.backend=torch", "parallel.kernels=[]", "parallel.compile=false"),
    "fused": ("parallel.backend=torch", 'parallel.kernels=["all"]', "parallel.compile=false"),
    "compile": ("parallel.backend=torch", "parallel.kernels=[]", "parallel.compile=true"),
    "fused+compile": ("parallel.backend=torch", 'parallel.kernels=["all"]', "parallel.compile=true"),
}


def fp8_paths() -> list[tuple[str, dict[str, tuple[str, ...]], str | None]]:
    """[(path, {variant: --set items}, why unavailable or None)] for every FP8 path scaletrain has:
    Transformer Engine's, and torchao's float8 training on the torch backend (compiled, as it needs; its bf16
    reference is the 'compile' row)."""
    import torch

    from scaletrain.config.schema import PrecisionConfig
    from scaletrain.nn.backend import te_importable
    from scaletrain.nn.float8 import float8_problem

    ok, detail = te_importable()
    te = {"te bf16": ("parallel.backend=te", "parallel.kernels=[]", "parallel.compile=false"),
          "te fp8": ("parallel.backend=te", "parallel.kernels=[]", "parallel.compile=false", "precision.fp8=true",
                     "precision.fp8_recipe=current")}
    ao = {f"torchao fp8 {recipe}": ("parallel.backend=torch", "parallel.kernels=[]", "parallel.compile=true",
                                    "precision.fp8=true", "precision.fp8_backend=torchao",
                                    f"precision.fp8_recipe={recipe}") for recipe in ("tensorwise", "rowwise")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [("transformer_engine", te, None if ok else detail),
            ("torchao", ao, float8_problem(PrecisionConfig(fp8=True, fp8_backend="torchao"), device))]


def fit(shape: Shape, seq: int, variant_sets: tuple[str, ...], memory_gb: float) -> tuple[list[str], str]:
    """--set items for the largest micro-batch (then full recomputation) whose planned peak fits HEADROOM of
    the device's memory, and a note; ([], why) when nothing fits."""
    from scaletrain.commands.profile import resolved_config
    from scaletrain.profile.planner import plan

    budget = HEADROOM * memory_gb
    peak = 0.0
    tries = [(mbs, "none") for mbs in shape.micro_batches] + [(mbs, "full") for mbs in shape.micro_batches[-2:]]
    for mbs, recompute in tries:
        micro = max(1, shape.tokens_per_step // (mbs * seq))
        sets = [*shape.sets, *variant_sets, f"train.seq_length={seq}", f"train.micro_batch_size={mbs}",
                f"train.global_batch_size={mbs * micro}", f"parallel.recompute={recompute}",
                "precision.dtype=bfloat16"]
        p = plan(resolved_config(str(REPO / shape.config), sets, 1), 1)
        peak = p.peak_stage.total_bytes / 2**30
        if peak <= budget:
            return sets, f"mbs {mbs}×{micro}{', recompute' if recompute == 'full' else ''}, plan {peak:.1f} GiB"
    return [], f"does not fit: the planner needs {peak:.1f} GiB at mbs 1 with recomputation, > {budget:.1f} GiB"


def build_rows(shape: Shape, work: Path, memory_gb: float, quick: bool) -> list[Row]:
    py = sys.executable
    tok, prefix = work / "tokenizer", work / "corpus"
    rows = [
        Row("env: runtime requirements", [py, "benchmarks/gpu/wheels.py", "check", "--installed"], 60),
        Row("kernels: tests/test_kernels.py", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                               "tests/test_kernels.py", *shape.kernel_tests], 180),
        Row("attention: test_context_parallel -k cuda", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                          "tests/test_context_parallel.py", "-k", "cuda"], 90),
        Row("data: tokenizer + .bin/.idx", [
            "bash", "-c", f"set -e; {py} -m scaletrain data tokenizer --input builtin:kjv --vocab-size "
            f"{shape.tokenizer_vocab} --output {tok}; {py} -m scaletrain data preprocess --input builtin:kjv "
            f"--tokenizer {tok} --output-prefix {prefix} --workers 4"], 150, group="data"),
    ]
    paths = fp8_paths()
    te_why = paths[0][2]
    rows.insert(3, Row("te tests: tests/test_te_backend.py",
                       None if te_why else [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_te_backend.py"],
                       240, required=te_why is None, status="unavailable" if te_why else "left out", detail=te_why or ""))
    first, *longer = shape.seqs
    plan_rows: list[tuple[int, str, tuple[str, ...], str | None]] = []
    for seq in (first, *(() if quick else longer)):  # the first length's every variant before longer ones
        plan_rows += [(seq, v, s, None) for v, s in VARIANTS.items()]
        if quick and longer:  # the long sequence once, early: fused kernels, no compile to wait for
            plan_rows.insert(2, (longer[0], "fused", VARIANTS["fused"], None))
        for path, variants, why in paths:
            if why is None:
                plan_rows += [(seq, v, s, None) for v, s in variants.items()]
            elif seq == first:
                plan_rows.append((seq, f"fp8 ({path})", (), why))
    for seq, variant, sets, why in plan_rows:
        name = f"throughput: seq {seq} {variant}"
        if why is not None:
            rows.append(Row(name, None, 0, group="throughput", required=False, status="unavailable", detail=why,
                            seq=seq, variant=variant))
            continue
        fitted, note = fit(shape, seq, sets, memory_gb)
        if not fitted:
            rows.append(Row(name, None, 0, group="throughput", required=False, status="skipped", detail=note,
                            seq=seq, variant=variant))
            continue
        out = work / f"profile-{seq}-{variant.replace(' ', '_').replace('+', '_')}.json"
        cmd = [py, "-m", "scaletrain", "profile", "--config", shape.config, "--steps", str(shape.steps),
               "--warmup", str(shape.warmup), "--phase-steps", "1", "--gpu-memory-gb", f"{memory_gb:.0f}",
               "--json", str(out)]
        for s in [*fitted, f"data.tokenizer={tok}", f'data.prefixes=["{prefix}"]']:
            cmd += ["--set", s]
        compiled = "compile" in variant
        rows.append(Row(name, cmd, 240 if compiled else 150, group="throughput", detail=note, json_out=out,
                        seq=seq, variant=variant))
    return rows


def run_rows(rows: list[Row], budget_s: float, env: dict[str, str], min_start_s: float = 30.0) -> None:
    """Run the rows in order; a row gets min(its timeout, the time left) and is left out when less than
    min_start_s is left. A throughput row needs the data row."""
    deadline = time.monotonic() + budget_s
    data_ok = True
    for row in rows:
        if row.cmd is None:
            continue
        if row.group == "throughput" and not data_ok:
            row.status, row.detail = "skipped", "no data (the data row failed)"
            continue
        left = deadline - time.monotonic()
        if left < min_start_s:
            row.status, row.detail = "left out", f"time budget ({budget_s:.0f} s) spent"
            continue
        timeout = min(row.timeout_s, left)
        print(f"--- {row.name} (timeout {timeout:.0f} s)", flush=True)
        t0 = time.monotonic()
        rc, out = run_command(row.cmd, timeout, env)
        row.wall_s = time.monotonic() - t0
        tail = " | ".join(line.strip() for line in out.strip().splitlines()[-3:])
        if rc is None:
            row.status, row.detail = "timeout", f"killed after {timeout:.0f} s; {tail[-300:]}"
        elif rc == 5 and "-k" in row.cmd:
            row.status, row.detail = "skipped", "no test selected here"
        elif rc != 0:
            row.status, row.detail = "FAIL", f"exit {rc}: {tail[-400:]}"
            print(out, flush=True)
        else:
            row.status = "pass"
            if row.json_out is not None:
                row.measured = json.loads(row.json_out.read_text())["measured"]
            elif row.group == "test":
                row.detail = tail[-200:]
        if row.group == "data" and row.status != "pass":
            data_ok = False


def loss_checks(rows: list[Row]) -> list[str]:
    """Each measured throughput row against the eager row of its sequence length: (first, last) step loss."""
    lines = []
    eager = {r.seq: r for r in rows if r.variant == "eager" and r.measured.get("losses")}
    te_bf16 = {r.seq: r for r in rows if r.variant == "te bf16" and r.measured.get("losses")}
    compiled = {r.seq: r for r in rows if r.variant == "compile" and r.measured.get("losses")}
    for r in rows:
        ref = (te_bf16 if r.variant == "te fp8" else compiled if r.variant.startswith("torchao") else eager).get(r.seq)
        if ref is None or r is ref or not r.measured.get("losses"):
            continue
        a, b = ref.measured["losses"], r.measured["losses"]
        if len(a) != len(b):
            lines.append(f"seq {r.seq} {r.variant}: not comparable (micro-batch differs from {ref.variant})")
            continue
        d1, dn = abs(b[0] / a[0] - 1), abs(b[-1] / a[-1] - 1)
        ok = d1 <= STEP_1_TOL and dn <= LAST_STEP_TOL
        lines.append(f"seq {r.seq} {r.variant} vs {ref.variant}: step 1 {b[0]:.4f} vs {a[0]:.4f} ({100 * d1:.2f}%), "
                     f"step {len(a)} {b[-1]:.4f} vs {a[-1]:.4f} ({100 * dn:.2f}%) — "
                     f"{'ok' if ok else f'FAIL (limits {100 * STEP_1_TOL:g}% / {100 * LAST_STEP_TOL:g}%)'}")
    return lines


def table(rows: list[Row]) -> str:
    head = f"{'row':<46} {'status':<11} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8} {'loss 1→N':>15} {'s':>5}  detail"
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r.measured
        if m:
            mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "—"
            losses = m.get("losses") or [float("nan")]
            nums = (f"{m['tokens_per_s_per_gpu']:>9,.0f} {m['tflops_per_gpu']:>8.1f} {mfu:>6} {m['peak_mem_gb']:>8.1f} "
                    f"{f'{losses[0]:.3f}→{losses[-1]:.3f}':>15}")
        else:
            nums = f"{'':>9} {'':>8} {'':>6} {'':>8} {'':>15}"
        lines.append(f"{r.name:<46} {r.status:<11} {nums} {r.wall_s:>5.0f}  {r.detail[:160]}")
    return "\n".join(lines)


def device_info(smoke: bool, env: dict[str, str]) -> tuple[str, float]:
    """(a header line, device memory in GB), read in a subprocess: this process never holds a CUDA context."""
    if smoke:
        return f"CPU smoke run: python {platform.python_version()} (tiny shapes; the planner is given 2 GB)", 2.0
    probe = ("import json, torch, triton; p = torch.cuda.get_device_properties(0); "
             "print(json.dumps([f'{p.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
             "triton {triton.__version__}', p.total_memory / 2**30]))")
    rc, out = run_command([sys.executable, "-c", probe], 120, env)
    if rc != 0:
        raise SystemExit(f"gpu_check: cannot read the CUDA device:\n{out}")
    name, mem = json.loads(out.strip().splitlines()[-1])
    return f"{name}, {mem:.1f} GiB, python {platform.python_version()}", mem


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seq 4096 in every variant, 8192 in fused+compile only")
    p.add_argument("--budget-s", type=float, default=390.0, help="total seconds for all rows")
    p.add_argument("--cpu-smoke", action="store_true", help="the same rows on CPU with tiny shapes")
    p.add_argument("--json", default="", help="write the rows (and measurements) here")
    args = p.parse_args(argv)
    env = child_env(args.cpu_smoke)
    shape = SMOKE if args.cpu_smoke else GPU
    header, memory_gb = device_info(args.cpu_smoke, env)
    print(f"gpu_check: {header}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    rows = build_rows(shape, work, memory_gb, args.quick)
    signal.signal(signal.SIGTERM, _interrupt)  # a runner's timeout ends the rows early; the table still prints
    try:
        run_rows(rows, args.budget_s, env)
    except KeyboardInterrupt:
        print("gpu_check: interrupted; the rows not run are 'left out'", flush=True)
    finally:
        print(f"\n=== gpu_check: {header} ===")
        print(table(rows))
        losses = loss_checks(rows)
        print("loss against the eager row (same seed, weights and data):" if losses else
              "loss: no two throughput rows of one shape measured")
        for line in losses:
            print("  " + line)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": header, "rows": [
                {k: (str(v) if isinstance(v, Path) else v) for k, v in r.__dict__.items()} for r in rows],
                "loss": losses}, indent=1))
    failed = [r.name for r in rows if r.required and r.status in ("FAIL", "timeout")]
    failed += [line for line in losses if "FAIL" in line]
    if failed:
        print("gpu_check: FAILED: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
