"""Stop requests: a signal asks the run to checkpoint at the next step boundary and exit for requeue.

Slurm sends `--signal=USR1@<seconds>` ahead of a job's time limit (and `scancel --signal=USR1` on
demand) to every process of the job step. The handler only sets a flag; at each step boundary every
rank takes part in one max all-reduce of that flag over the whole world, so all ranks agree on the
same step even when the signal reaches them at different times, then they save and exit together
with EXIT_REQUEUE. The launch script turns that exit code into `scontrol requeue`.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import torch

from scaletrain.distributed.comm import Comm

# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry".
EXIT_REQUEUE = 75


class StopRequest:
    """Flag set by any of `signals`; `agreed` turns per-rank flags into one collective decision."""

    def __init__(self, signals: tuple[str, ...], rank: int = 0) -> None:
        self.rank = rank
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}
        for name in signals:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"scaletrain: rank {self.rank} received {self.received}; checkpointing at the next step "
                  "boundary, then exiting for requeue", file=sys.stderr, flush=True)

    def agreed(self, world: Comm, device: torch.device) -> bool:
        """True on every rank if any rank has received a stop signal. Collective over `world`; host sync."""
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=device)
        world.all_reduce(flag, op="max")
        return bool(flag.item())

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()
