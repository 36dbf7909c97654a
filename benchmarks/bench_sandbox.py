"""Throughput of the python_tests reward: the bubblewrap sandbox (stages/rl/sandbox/runner.py) against the
implementation it replaced (a `python -I` child of the trainer with rlimits, copied below as the
baseline), on the same programs in the same run, interleaved rounds, medians.

    python benchmarks/bench_sandbox.py [--programs 48] [--rounds 3]

Programs: a GRPO batch's mix — a quarter right, a quarter wrong (an assert fails), a quarter syntax
errors, a quarter HumanEval-style `check(candidate)` with five asserts, half of those right.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scaletrain.stages.rl.sandbox.runner import SandboxSettings, describe, run_programs


def old_run_python_tests(code: str, tests: str, timeout_s: float = 5.0, memory_bytes: int = 1 << 30) -> bool:
    """The replaced implementation (scaletrain main before issue 21), verbatim in behaviour."""
    def limits() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (max(1, int(timeout_s)),) * 2)
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    with tempfile.TemporaryDirectory(prefix="scaletrain-reward-") as tmp:
        program = Path(tmp) / "candidate.py"
        program.write_text(code + "\n\n" + tests + "\n")
        try:
            proc = subprocess.run([sys.executable, "-I", str(program)], cwd=tmp, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout_s,
                                  env={"PATH": "/usr/bin:/bin"}, preexec_fn=limits)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0


def programs(n: int) -> tuple[list[tuple[str, str]], list[bool]]:
    right, wrong = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    he_right = "def incr_list(l):\n    return [x + 1 for x in l]\n"
    he_tests = ("def check(candidate):\n    assert candidate([]) == []\n    assert candidate([1]) == [2]\n"
                "    assert candidate([3, 2, 1]) == [4, 3, 2]\n    assert candidate([0, 0]) == [1, 1]\n"
                "    assert candidate([-1]) == [0]\n\ncheck(incr_list)\n")
    kinds = [((right, tests), True), ((wrong, tests), False), (("def add(a, b) return a", tests), False),
             ((he_right, he_tests), True), (("def incr_list(l):\n    return l\n", he_tests), False)]
    chosen = [kinds[[0, 1, 2, 3, 4, 3, 0, 1][i % 8]] for i in range(n)]
    return [p for p, _ in chosen], [ok for _, ok in chosen]


def timed(fn: Callable[[], list[bool]], want: list[bool]) -> float:
    start = time.perf_counter()
    got = fn()
    elapsed = time.perf_counter() - start
    assert got == want, "a verdict differs from the expected one"
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    progs, want = programs(args.programs)
    print(describe(SandboxSettings()))
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.programs} programs per round, {args.rounds} rounds")
    variants: dict[str, Callable[[], list[bool]]] = {
        "old: python -I child, serial (as GRPO called it)": lambda: [old_run_python_tests(c, t) for c, t in progs],
        "old: python -I child, 2 threads": lambda: list(ThreadPoolExecutor(2).map(
            lambda p: old_run_python_tests(*p), progs)),
    }
    for workers in (1, 2, 4):
        settings = SandboxSettings(workers=workers)
        variants[f"new: bwrap sandbox, {workers} at a time"] = \
            lambda s=settings: [v.passed and not v.error for v in run_programs(progs, s)]
    variants["new: posttrain.sandbox.backend = 'none', 2 at a time"] = \
        lambda: [v.passed for v in run_programs(progs, SandboxSettings(mode="none", workers=2))]
    run_programs(progs[:2], SandboxSettings())  # warm: the runtime is found once per process
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, want))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("| implementation | programs/s (median) | min–max |")
    print("|---|---|---|")
    for name, ts in times.items():
        rates = [args.programs / t for t in ts]
        print(f"| {name} | {statistics.median(rates):.1f} | {min(rates):.1f}–{max(rates):.1f} |")


if __name__ == "__main__":
    main()
