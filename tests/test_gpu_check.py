"""benchmarks/gpu_check.py on CPU: rows run in subprocesses that a timeout kills with their children, a spent
budget leaves rows out, the planner sizes the GPU rows (never past the device's memory), and the whole
check runs end to end on CPU (--cpu-smoke: the same rows with a tiny model) and prints its table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.e2e

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gpu_check  # dataclasses look their module up
spec.loader.exec_module(gpu_check)


def test_a_row_past_its_timeout_is_killed_with_its_children():
    t0 = time.monotonic()
    rc, out = gpu_check.run_command(["bash", "-c", "sleep 60 & echo child $!; wait"], 1.0, dict(os.environ))
    assert rc is None and time.monotonic() - t0 < 10
    child = int(out.split()[1])
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]


def test_a_spent_budget_leaves_rows_out_and_the_table_still_prints(tmp_path):
    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    rows = [gpu_check.Row("slow", sleep, 30), gpu_check.Row("next", sleep, 30),
            gpu_check.Row("fp8", None, 0, required=False, status="unavailable", detail="no FP8 path")]
    gpu_check.run_rows(rows, budget_s=2.0, env=dict(os.environ), min_start_s=1.0)
    assert [r.status for r in rows] == ["timeout", "left out", "unavailable"]
    text = gpu_check.table(rows)
    assert "timeout" in text and "time budget" in text and "no FP8 path" in text


def test_the_planner_sizes_the_gpu_rows_to_the_device():
    rows = gpu_check.build_rows(gpu_check.GPU, REPO / "unused", 79.2, quick=True)  # an H100 80GB's memory
    seqs = {(r.seq, r.variant): r for r in rows if r.group == "throughput"}
    assert {(4096, "eager"), (4096, "fused"), (4096, "compile"), (4096, "fused+compile"), (8192, "fused")} <= set(seqs)
    for r in seqs.values():
        if r.cmd is None:
            assert r.status == "unavailable" and "fp8" in r.variant  # no Transformer Engine here
            continue
        planned = float(r.detail.split("plan ")[1].split(" GiB")[0])
        assert planned <= gpu_check.HEADROOM * 79.2
        assert f"train.seq_length={r.seq}" in r.cmd
    small = gpu_check.build_rows(gpu_check.GPU, REPO / "unused", 12.0, quick=True)
    assert all(r.cmd is None and r.status in ("skipped", "unavailable") for r in small if r.group == "throughput")
    assert any("does not fit" in r.detail for r in small)


@pytest.mark.slow
def test_cpu_smoke_runs_every_row_and_prints_the_table(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--quick", "--budget-s", "900",
                        "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "=== gpu_check: CPU smoke run" in r.stdout and "tok/s" in r.stdout
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    for name in ("env: runtime requirements", "kernels: tests/test_kernels.py", "data: tokenizer + .bin/.idx",
                 "throughput: seq 16 eager", "throughput: seq 16 fused", "throughput: seq 32 fused",
                 "throughput: seq 16 compile", "throughput: seq 16 fused+compile"):
        assert rows[name]["status"] == "pass", rows[name]
    assert rows["throughput: seq 16 fp8 (transformer_engine)"]["status"] == "unavailable"
    assert rows["throughput: seq 16 eager"]["measured"]["tokens_per_s_per_gpu"] > 0
    assert "seq 16 fused+compile vs eager" in r.stdout and "— ok" in r.stdout
