"""An NCCL-like point-to-point transport for forked test ranks (dist_harness, p2p="rendezvous").

gloo buffers sends and matches messages by tag, so a pipeline ordering that hangs under NCCL passes
on CPU. Installed as `Comm.p2p_transport`, this transport gives `Comm.batch_p2p` NCCL's semantics:

- one stream per rank: batches run one after another in posting order; a batch starts only when the
  one before it completed, and its ops progress together (an NCCL group);
- rendezvous: a send completes only once the matching receive is active on the peer (its batch has
  started); the data moves then;
- matching by per-peer order, per group, ignoring tags: the k-th send from A to B meets B's k-th
  receive from A. A size mismatch is an error (NCCL would hang or corrupt memory), and so is a tag
  mismatch (NCCL would silently hand over the wrong tensor);
- a batch that makes no progress for `timeout` seconds has deadlocked: it fails, naming what it
  waits for, and so does every batch after it on that rank.

Each rank has an inbox (a multiprocessing queue created before the fork) and a progress thread that
runs its stream. The harness tells every rank when a peer has died, as a closed gloo connection would.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from typing import Any

import torch

from scaletrain.distributed.comm import Comm
from scaletrain.distributed.p2p import P2POp


class _Batch:
    def __init__(self, group: tuple, ops: list[tuple[str, torch.Tensor, int, int]], timeout: float) -> None:
        self.group, self.ops, self.timeout = group, ops, timeout
        self.error: str | None = None
        self.done = threading.Event()

    def fail(self, error: str) -> None:
        self.error = error
        self.done.set()

    def wait(self) -> None:
        if not self.done.wait(self.timeout + 60):
            raise RuntimeError("rendezvous p2p: the progress thread stopped answering")
        if self.error is not None:
            raise RuntimeError(self.error)


def _encode(t: torch.Tensor) -> tuple[bytes, str, tuple[int, ...]]:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), str(t.dtype), tuple(t.shape)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class RendezvousP2P:
    """The transport of one rank: `post` queues a batch on this rank's stream (see module docstring)."""

    def __init__(self, rank: int, inboxes: list, timeout: float) -> None:
        self.rank, self.inboxes, self.timeout = rank, inboxes, timeout
        self.stream: queue.Queue[_Batch] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.current: _Batch | None = None

    def post(self, comm: Comm, ops: list[P2POp]) -> list[_Batch]:
        ranks = comm.global_ranks()
        batch = _Batch((comm.name, tuple(ranks)), [(op.kind, op.tensor, ranks[op.peer], op.tag) for op in ops],
                       self.timeout)
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, daemon=True, name="rendezvous-p2p")
            self.thread.start()
        self.stream.put(batch)
        return [batch]

    def close(self) -> None:
        """Flush what this process put on its peers' inboxes (call before the process exits)."""
        for q in self.inboxes:
            q.close()
            q.join_thread()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # never leave a waiter hanging on a crashed progress thread
            error = f"rendezvous p2p: the progress thread crashed: {type(e).__name__}: {e}"
            if self.current is not None:
                self.current.fail(error)
            while True:
                self.stream.get().fail(error)

    def _serve(self) -> None:
        seq: dict[tuple, int] = defaultdict(int)  # (group, "send"/"recv", peer) → next message number
        ready: dict[tuple, tuple] = {}  # (group, peer, n): peer's receive n from us is active (tag, bytes)
        data: dict[tuple, tuple] = {}  # (group, peer, n): peer's send n to us arrived
        dead: set[int] = set()
        broken: str | None = None
        inbox = self.inboxes[self.rank]
        while True:
            batch = self.current = self.stream.get()
            if broken is not None:
                batch.fail(f"rendezvous p2p: an earlier batch on this rank failed ({broken})")
                continue
            g = batch.group
            sends, recvs = [], []
            for kind, t, peer, tag in batch.ops:  # the batch starts: number its messages per peer
                n = seq[(g, kind, peer)]
                seq[(g, kind, peer)] += 1
                if kind == "send":
                    sends.append((t, peer, tag, n))
                else:
                    recvs.append((t, peer, tag, n))
                    self.inboxes[peer].put(("ready", g, self.rank, n, tag, _nbytes(t)))
            last = time.monotonic()
            error = None
            while (sends or recvs) and error is None:
                for op in list(sends):
                    t, peer, tag, n = op
                    if (g, peer, n) in ready:
                        their_tag, nbytes = ready.pop((g, peer, n))
                        problem = None
                        if nbytes != _nbytes(t):
                            problem = f"{_nbytes(t)} bytes sent, {nbytes} bytes expected"
                        elif their_tag != tag:
                            problem = (f"tag {tag} sent where tag {their_tag} is expected: the two ranks post their "
                                       "messages in different orders, and NCCL, which ignores tags, would deliver "
                                       "the wrong tensor")
                        if problem:
                            error = f"rendezvous p2p: rank {self.rank} → rank {peer}, message {n}: {problem}"
                        self.inboxes[peer].put(("data", g, self.rank, n, tag, error, *_encode(t)))
                        sends = [o for o in sends if o is not op]  # (list.remove would compare tensors)
                        last = time.monotonic()
                for op in list(recvs):
                    t, peer, tag, n = op
                    if (g, peer, n) in data:
                        _tag, problem, raw, dtype, shape = data.pop((g, peer, n))
                        if problem:
                            error = problem
                        else:
                            got = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                            t.copy_(got.view(getattr(torch, dtype.removeprefix("torch."))).reshape(shape))
                        recvs = [o for o in recvs if o is not op]
                        last = time.monotonic()
                if error is not None or not (sends or recvs):
                    break
                waiting = sorted({peer for _t, peer, _tag, _n in sends + recvs})
                if dead.intersection(waiting):
                    error = f"rendezvous p2p: rank {sorted(dead.intersection(waiting))[0]} died (connection closed)"
                    break
                if time.monotonic() - last > self.timeout:
                    error = ("rendezvous p2p: deadlock — no progress for "
                             f"{self.timeout:.0f} s; rank {self.rank} waits to " + "; ".join(
                                 [f"send message {n} (tag {tag}) to rank {peer}, which has not posted its receive"
                                  for _t, peer, tag, n in sends]
                                 + [f"receive message {n} (tag {tag}) from rank {peer}, which has not sent it"
                                    for _t, peer, tag, n in recvs]))
                    break
                try:
                    msg: Any = inbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                if msg[0] == "dead":
                    dead.add(msg[1])
                elif msg[0] == "ready":
                    _kind, mg, peer, n, tag, nbytes = msg
                    ready[(mg, peer, n)] = (tag, nbytes)
                else:
                    _kind, mg, peer, n, tag, problem, raw, dtype, shape = msg
                    data[(mg, peer, n)] = (tag, problem, raw, dtype, shape)
            if error is not None:
                broken = error
                batch.fail(error)
            else:
                batch.done.set()


def install(rank: int, inboxes: list, timeout: float) -> RendezvousP2P:
    """Make every Comm of this (forked) process use the rendezvous transport."""
    transport = RendezvousP2P(rank, inboxes, timeout)
    Comm.p2p_transport = transport
    return transport
