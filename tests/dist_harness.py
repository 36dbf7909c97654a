"""Multi-process tests without torchrun: ranks forked from the warm pytest process.

Each rank joins a gloo group through a FileStore in a temporary directory, runs one thread, and
sends back its result or its traceback. A rank that dies, or a run that passes its deadline, fails
the test with every rank's report instead of hanging. TORCH_DISTRIBUTED_DEBUG=DETAIL makes gloo
check that every rank calls the same collective with the same shapes (without it a mismatch can
silently return garbage).

Point-to-point traffic (`Comm.batch_p2p`, the pipeline schedules) runs by default through an
NCCL-like rendezvous transport (rendezvous_p2p.py: a send completes only once its receive is posted,
messages matched by per-peer order, tags ignored), so an ordering that would hang under NCCL fails
here too instead of being hidden by gloo's buffering; p2p="gloo" keeps torch.distributed's own.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any


class RankFailure(AssertionError):
    pass


def _worker(rank: int, world: int, store: str, fn: Callable, args: tuple, q, timeout: float,
            inboxes: list | None, p2p_timeout: float) -> None:
    code = 0
    transport = None
    try:
        import torch
        import torch.distributed as dist

        os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
        torch.set_num_threads(1)
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        if inboxes is not None:
            from rendezvous_p2p import install

            transport = install(rank, inboxes, p2p_timeout)
        try:
            # Plain pickle, not the queue's ForkingPickler: torch's reducers would share tensors
            # through file descriptors that die with this process.
            q.put((rank, True, pickle.dumps(fn(rank, world, *args))))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except BaseException:
        q.put((rank, False, traceback.format_exc()))
        code = 1
    finally:
        q.close()
        q.join_thread()
        if transport is not None:
            transport.close()  # flush messages still on their way to peers
        os._exit(code)  # never run the parent's (pytest's) exit handlers in a child


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, p2p: str = "rendezvous",
              p2p_timeout: float | None = None) -> list[Any]:
    """Run fn(rank, world, *args) on `world` forked ranks; return their results in rank order.
    p2p: "rendezvous" (NCCL-like point-to-point, see above; a batch that makes no progress for
    p2p_timeout seconds, default `timeout`, fails as deadlocked) or "gloo"."""
    if p2p not in ("rendezvous", "gloo"):
        raise ValueError(f"p2p = {p2p!r}: choose 'rendezvous' or 'gloo'")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(world)] if p2p == "rendezvous" else None
    announced: set[int] = set()

    def announce_failures() -> None:  # as a closed connection would: peers stop waiting for a failed rank
        for r in set(errors) - announced:
            announced.add(r)
            for peer, inbox in enumerate(inboxes or []):
                if peer != r:
                    inbox.put(("dead", r))

    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "store"), fn, args, q, timeout,
                                                   inboxes, p2p_timeout or timeout))
                 for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        grace_until = None
        while len(results) + len(errors) < world:
            try:
                rank, ok, payload = q.get(timeout=0.1)
                (results if ok else errors)[rank] = payload
                if not ok and grace_until is None:
                    grace_until = time.monotonic() + 5.0  # peers are likely blocked in a collective
                announce_failures()
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                if p.exitcode not in (None, 0) and r not in results and r not in errors:
                    time.sleep(0.2)  # its report may still be in flight
                    try:
                        while True:
                            rank, ok, payload = q.get_nowait()
                            (results if ok else errors)[rank] = payload
                    except queue.Empty:
                        pass
                    errors.setdefault(r, f"rank {r} died with exit code {p.exitcode} before reporting")
                    grace_until = grace_until or time.monotonic() + 5.0
            announce_failures()
            now = time.monotonic()
            if now > deadline or (grace_until is not None and now > grace_until):
                for r in range(world):
                    if r not in results and r not in errors:
                        errors[r] = f"rank {r} did not finish ({'deadline' if now > deadline else 'a peer failed'})"
                break
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
        for inbox in inboxes or []:
            inbox.cancel_join_thread()  # the ranks are gone: nothing needs what is still buffered
            inbox.close()
    if errors:
        report = "\n".join(f"----- rank {r} -----\n{errors[r]}" for r in sorted(errors))
        raise RankFailure(f"{len(errors)} of {world} ranks failed:\n{report}")
    return [pickle.loads(results[r]) for r in range(world)]


def cli_rank(rank: int, world: int, args: list[str]) -> int:
    """One rank of `scaletrain ARGS…` in this (forked) process: the launcher's variables, then the real CLI."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from scaletrain.cli import main  # (after the rank's environment is set)

    return main(args)


def compiled_cli_rank(rank: int, world: int, args: list[str]) -> tuple[int, int, dict[str, int]]:
    """`cli_rank` under torch.compile: the exit code, how many graphs dynamo compiled here and the graph
    breaks it took (reason → count)."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    # Compile in this process: a forked rank must not use the compile-worker pool its parent started.
    torch._inductor.config.compile_threads = 1
    counters.clear()  # a forked rank starts with its parent's counts (earlier tests' graphs)
    return cli_rank(rank, world, args), counters["stats"]["unique_graphs"], dict(counters["graph_break"])
