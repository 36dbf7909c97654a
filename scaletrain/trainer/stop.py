"""Stop requests: a signal asks the run to checkpoint at the next step boundary and exit.

Slurm sends `--signal=USR1@<seconds>` ahead of a job's time limit (and `scancel --signal=USR1` on
demand), and SIGTERM at preemption, plain `scancel` and the time limit itself, to every process of
the job step; both are in `train.stop_signals` by default. The handler only sets a flag; at each
step boundary every rank takes part in one max all-reduce of the flags (`agree`) over the whole world,
so all ranks agree on the same step even when the signal reaches them at different times, then they
save and exit together with EXIT_REQUEUE. The launch script turns that exit code into `scontrol requeue`.

SIGINT (Ctrl-C), unless listed in `train.stop_signals`, is an interrupt: the same clean stop at the
next step boundary, but exit code EXIT_INTERRUPTED, which no launch script requeues; a second SIGINT
raises KeyboardInterrupt at once (no checkpoint).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

import torch

from scaletrain.distributed.comm import Comm

# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry".
EXIT_REQUEUE = 75
# 128 + SIGINT: what a shell reports for a program stopped by Ctrl-C.
EXIT_INTERRUPTED = 130
SECOND_SIGINT_S = 1.0


def agree(flags: Sequence[bool], world: Comm, device: torch.device) -> list[bool]:
    """Each flag OR-ed over every rank of `world` (of size 1: this process alone), so that all ranks take
    the same decision. Collective over `world`: one max all-reduce; host sync."""
    if world.size == 1 or not flags:
        return [bool(f) for f in flags]
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    world.all_reduce(t, op="max")
    return [bool(v) for v in t.tolist()]


class StopRequest:
    """Flags set by any of `signals` (requeue) or by SIGINT (interrupt); `agree` turns per-rank flags
    into one collective decision."""

    def __init__(self, signals: tuple[str, ...], rank: int = 0) -> None:
        self.rank = rank
        self.received: str | None = None  # the first stop signal's name
        self.interrupted = False  # that signal was SIGINT outside `signals`: stop without requeue
        self._since = 0.0  # when it came (time.monotonic)
        self._previous: dict[signal.Signals, object] = {}
        for name in signals:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)
        if "SIGINT" not in signals:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._since = signal.Signals(signum).name, time.monotonic()
            print(f"scaletrain: rank {self.rank} received {self.received}; checkpointing at the next step "
                  "boundary, then exiting for requeue", file=sys.stderr, flush=True)

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            # A second Ctrl-C stops now; one that follows within a second is the same Ctrl-C passed on
            # (torchrun forwards the SIGINT its workers already got from the terminal).
            if time.monotonic() - self._since >= SECOND_SIGINT_S:
                raise KeyboardInterrupt
            return
        self.received, self.interrupted, self._since = "SIGINT", True, time.monotonic()
        print(f"scaletrain: rank {self.rank} received SIGINT; checkpointing at the next step boundary, then "
              "stopping (press Ctrl-C again to stop at once, without a checkpoint)", file=sys.stderr, flush=True)

    @property
    def requeue(self) -> bool:
        """A stop signal (not an interrupt) was received on this rank."""
        return self.received is not None and not self.interrupted

    def agreed(self, world: Comm, device: torch.device) -> bool:
        """True on every rank if any rank has received a stop signal. Collective over `world`; host sync."""
        return agree([self.received is not None], world, device)[0]

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()


def exit_code(outcome: str) -> int:
    """The process exit code of a run's outcome ('done' and 'exit' are 0)."""
    return {"stopped": EXIT_REQUEUE, "interrupted": EXIT_INTERRUPTED}.get(outcome, 0)
