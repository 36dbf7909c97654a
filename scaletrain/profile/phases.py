"""Wall time per phase of a training step (forward, backward, communication, optimizer, pipeline wait).

A leaf module (no scaletrain imports) so that every layer can mark its phases. Phases cost one
global lookup while no clock is active; `scaletrain profile` activates a clock for a few steps.
On CUDA the clock synchronises the device at phase boundaries, so each phase's time is its own —
which also removes compute/communication overlap: throughput is measured on separate steps
without the clock. Phases nest (tensor-parallel communication inside forward and backward); each
phase also appears in torch.profiler traces as `scaletrain.<name>`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_active: PhaseClock | None = None


class PhaseClock:
    """Accumulated seconds and entries per phase name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextmanager
def phase(name: str) -> Iterator[None]:
    clock = _active
    if clock is None:
        yield
        return
    clock.sync()
    t0 = time.perf_counter()
    with torch.profiler.record_function(f"scaletrain.{name}"):
        yield
    clock.sync()
    clock.seconds[name] += time.perf_counter() - t0
    clock.calls[name] += 1


@contextmanager
def recording(device: torch.device) -> Iterator[PhaseClock]:
    """Activate a clock for the enclosed steps (not re-entrant)."""
    global _active
    clock = PhaseClock(device)
    _active = clock
    try:
        yield clock
    finally:
        _active = None
