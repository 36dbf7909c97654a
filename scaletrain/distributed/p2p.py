"""Point-to-point batches (pipeline traffic): what `Comm.batch_p2p` posts and the handle it returns.

Under NCCL, p2p between two ranks runs in order on one stream, messages are matched by their order
per peer (tags are ignored), and a large send completes only once the peer has posted the matching
receive. So the two ends of a pair must post their messages in the same order, and whatever one
rank waits for must not sit behind a send its peer has not yet received: a batch
(`dist.batch_isend_irecv`, one NCCL group) posts its sends and receives together. The pipeline
schedules plan their batches so (parallel/pipeline/p2p_plan.py).

The transport is a seam: `Comm.p2p_transport` is `TorchP2P` in every run; the test harness installs an
NCCL-like rendezvous transport over forked ranks (tests/rendezvous_p2p.py), so that gloo, which
buffers sends and honours tags, cannot hide an ordering that would deadlock under NCCL.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from scaletrain.distributed.comm import Comm


@dataclass(frozen=True)
class P2POp:
    """One transfer of a batch: send `tensor` (contiguous) to group rank `peer`, or receive into it
    (preallocated, contiguous) from `peer`. `tag` is for gloo and the harness's order check only."""

    kind: Literal["send", "recv"]
    tensor: torch.Tensor
    peer: int
    tag: int = 0


class P2PTransport(Protocol):
    def post(self, comm: Comm, ops: list[P2POp]) -> list:
        """Start the batch; return objects whose `wait()` together complete it."""
        ...


class TorchP2P:
    """torch.distributed's `batch_isend_irecv`: NCCL coalesces the batch into one group (one handle);
    gloo posts its ops one by one (a handle each) and buffers sends."""

    def post(self, comm: Comm, ops: list[P2POp]) -> list:
        ranks = comm.global_ranks()
        return dist.batch_isend_irecv([
            dist.P2POp(dist.isend if op.kind == "send" else dist.irecv, op.tensor, peer=ranks[op.peer],
                       group=comm.group, tag=op.tag) for op in ops])


class P2PWork:
    """The handle of one posted batch: `wait` returns once every op of it has completed (idempotent).
    Keep the batch's tensors alive until then."""

    def __init__(self, works: list, ops: list[P2POp], named: Callable[[str], AbstractContextManager]) -> None:
        # named: the Comm's failure wrapper (names the group and its ranks in the error)
        self._works, self.ops, self._named, self._done = works, ops, named, False

    def wait(self) -> None:
        if self._done:
            return
        with self._named("batch_p2p"):
            for w in self._works:
                w.wait()
        self._done = True
