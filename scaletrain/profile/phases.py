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
        # The order things happened in: ("begin" | "end", phase) around phases and ("mark", what) for instants
        # such as a collective being posted — the overlap traces (communication posted before the compute
        # that follows it) are read from here.
        self.events: list[tuple[str, str]] = []

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
    clock.events.append(("begin", name))
    with torch.profiler.record_function(f"scaletrain.{name}"):
        yield
    clock.sync()
    clock.events.append(("end", name))
    clock.seconds[name] += time.perf_counter() - t0
    clock.calls[name] += 1


def mark(what: str) -> None:
    """An instant in the active clock's event list (and a zero-length range in torch.profiler traces): e.g. a
    collective posted. Free while no clock is active."""
    clock = _active
    if clock is None:
        return
    clock.events.append(("mark", what))
    with torch.profiler.record_function(f"scaletrain.mark.{what}"):
        pass


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
