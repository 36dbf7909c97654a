"""Per-rank step heartbeats in the rendezvous store, to name the rank a failed collective waited for.

A timed-out collective only knows its group; when a peer hangs (a stuck data loader, a GPU fault,
SIGSTOP) every other rank times out with the same message. Each rank records the step it is on in
the key-value store every rank already shares (one small set per step). After a failure each
survivor records that it failed, waits a short grace period for the others to do the same, and
names the ranks that are behind (never reached the step) or silent (reached it but never reported
a failure: hung, or dead without the launcher noticing yet).
"""

from __future__ import annotations

import time

import torch.distributed as dist

_PREFIX = "scaletrain/heartbeat/"


class Heartbeat:
    """Step heartbeats of every rank. No-op at world size 1 or without a default process group."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.store = None
        if world_size > 1 and dist.is_initialized():
            try:  # the default group's store (TCPStore/FileStore); no public accessor exists
                self.store = dist.distributed_c10d._get_default_store()
            except (RuntimeError, AttributeError, ValueError):
                self.store = None

    def beat(self, step: int) -> None:
        """Record that this rank has started `step` (one store round trip)."""
        if self.store is not None:
            self.store.set(f"{_PREFIX}{self.rank}", str(step))

    def suspects(self, step: int, grace_s: float) -> str:
        """After a failed collective at `step`: who is behind or silent, as one line for the error."""
        if self.store is None:
            return "no store to ask which rank is missing"
        try:
            self.store.set(f"{_PREFIX}failed/{self.rank}", str(step))
            keys = [f"{_PREFIX}failed/{r}" for r in range(self.world_size)]
            deadline = time.monotonic() + grace_s
            while True:
                reported = {r for r, k in enumerate(keys) if self.store.check([k])}
                if len(reported) == self.world_size or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        except (RuntimeError, ValueError):
            return "the rendezvous store is unreachable (its host, rank 0 or the launcher, may be the one that died)"
        behind = self.behind(step)
        silent = sorted(set(range(self.world_size)) - reported - set(behind))
        parts = [describe_behind(behind, step)] if behind else []
        if silent:
            parts.append(f"ranks at step {step} that reported no error within {grace_s:.0f} s (hung or dead): {silent[:16]}")
        return "; ".join(parts) or f"every rank reported the failure at step {step}"

    def behind(self, step: int) -> dict[int, int | None]:
        """Ranks that have not started `step`: {rank: last step recorded (None: none)}. Best effort:
        an unreachable store (rank 0 itself died) gives {}."""
        if self.store is None:
            return {}
        out: dict[int, int | None] = {}
        try:
            for r in range(self.world_size):
                key = f"{_PREFIX}{r}"
                last = int(self.store.get(key)) if self.store.check([key]) else None
                if last is None or last < step:
                    out[r] = last
        except (RuntimeError, ValueError):
            return {}
        return out


def describe_behind(behind: dict[int, int | None], step: int) -> str:
    """One line for a non-empty {rank: last step} of ranks that have not reached `step`."""
    parts = [f"rank {r} (last at step {s})" if s is not None else f"rank {r} (never started a step)"
             for r, s in sorted(behind.items())]
    return f"ranks that have not reached step {step}: " + ", ".join(parts[:16]) + (" …" if len(parts) > 16 else "")
