"""Measured peak memory of a piece of work on the CPU, where no allocator statistics exist: torch's profiler
records every allocation and free ([memory] events with the running total allocated since it started);
the peak of that total is what the work allocated at most on top of what was live before it.

Used to check the planner against real runs on CPU (tests/test_memory_plan.py): static memory (weights,
gradient buckets, optimizer state: trainer/memory.py) + this peak during a training step.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any


def peak_allocated_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run fn(); return (its result, the peak bytes allocated during it beyond what was live before)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    # The profiler's own running total does not go down when a block allocated before it started is freed;
    # follow the blocks allocated inside by address instead.
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0),
                 key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live: dict[int, int] = {}
    total = peak = 0
    for e in mem:
        addr, nbytes = e["args"]["Addr"], e["args"]["Bytes"]
        if nbytes > 0:
            live[addr] = nbytes
            total += nbytes
            peak = max(peak, total)
        elif addr in live:
            total -= live.pop(addr)
    return out, peak
