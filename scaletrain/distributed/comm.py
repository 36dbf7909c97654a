"""The one module that calls torch.distributed collectives.

A `Comm` wraps one process group (tp, dp, …). At size 1 every collective returns its input, so a
single process runs the same code with no group at all. Collectives work on contiguous tensors and
along dim 0 (flat layouts); `dim` arguments move the dimension first and back (a copy when dim≠0).
Every call adds its payload to `stats` (bytes of the full tensor each op logically moves), which the
communication benchmark compares with Megatron's theoretical minimum.

Inside a region torch.compile traces (parallel.compile: a block's forward and its backward),
all_reduce / all_gather / reduce_scatter are functional collectives instead, which dynamo records
into the graph: an in-place c10d call would end the graph there, leaving the block in pieces that
inductor fuses and schedules separately. There they return a new tensor (use the return value, not
the argument), do not count in `stats`, and a failure surfaces as the backend's own error.

Flat all-gather and reduce-scatter go through `flat_collectives()`: recent torch (2.13) names them
`all_gather_single` / `reduce_scatter_single` and deprecates the older names; torch 2.11 — the oldest
release supported, what CUDA 13 images ship — has only `all_gather_into_tensor` /
`reduce_scatter_tensor`, with the same arguments and semantics. The functional collectives used
under torch.compile (`all_gather_tensor`, `reduce_scatter_tensor`, `all_reduce`) exist in both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from scaletrain.distributed.p2p import P2POp, P2PTransport, P2PWork, TorchP2P
from scaletrain.profile.phases import phase


@dataclass
class CommStats:
    """Payload bytes and call counts per operation since the last reset."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, op: str, t: torch.Tensor) -> None:
        self.bytes[op] += t.numel() * t.element_size()
        self.calls[op] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def total(self) -> int:
        return sum(self.bytes.values())


def flat_collectives(api: ModuleType | Any = dist) -> tuple[Any, Any]:
    """(all_gather, reduce_scatter) over flat dim-0 layouts, from `api` (torch.distributed): the
    `*_single` names where this torch has them, else the older `all_gather_into_tensor` /
    `reduce_scatter_tensor` (torch 2.11). Both take (output, input, [op,] group=, async_op=)."""
    gather = getattr(api, "all_gather_single", None) or getattr(api, "all_gather_into_tensor", None)
    scatter = getattr(api, "reduce_scatter_single", None) or getattr(api, "reduce_scatter_tensor", None)
    if gather is None or scatter is None:
        raise ImportError(f"torch {torch.__version__}: torch.distributed has neither all_gather_single nor "
                          "all_gather_into_tensor (or the reduce-scatter pair); scaletrain needs torch >= 2.11.")
    return gather, scatter


# Chosen once at import; tests swap them to run the fallback on a torch that has both.
all_gather_flat, reduce_scatter_flat = flat_collectives()


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer died, hung, or called a different collective."""


class Comm:
    """Collectives over one group. rank/size are this process's place in that group.

    A failing or timed-out collective raises CollectiveError naming this rank, the operation, the
    group and the global ranks in it, so a job log says where it stopped instead of a bare gloo/NCCL
    message.
    """

    # How batch_p2p reaches the peers: torch.distributed; the test harness swaps in an NCCL-like
    # rendezvous transport (distributed/p2p.py).
    p2p_transport: P2PTransport = TorchP2P()

    def __init__(self, group: dist.ProcessGroup | None, size: int, rank: int, name: str) -> None:
        self.group, self.size, self.rank, self.name = group, size, rank, name
        self.stats = CommStats()

    @classmethod
    def single(cls, name: str) -> Comm:
        return cls(None, 1, 0, name)

    def global_ranks(self) -> list[int]:
        """Global ranks of this group's members, in group-rank order."""
        if self.size == 1 and self.group is None and not dist.is_initialized():
            return [0]
        return dist.get_process_group_ranks(self.group or dist.group.WORLD)  # type: ignore[arg-type]

    @contextmanager
    def _named(self, op: str) -> Iterator[None]:
        try:
            with phase(f"comm.{self.name}"):
                yield
        except RuntimeError as e:  # DistBackendError and gloo/NCCL timeouts are RuntimeErrors
            if isinstance(e, CollectiveError):
                raise
            me = dist.get_rank() if dist.is_initialized() else 0
            try:
                members = f"global ranks {self.global_ranks()}"
            except RuntimeError:  # the group itself may be unusable by now
                members = f"{self.size} ranks"
            raise CollectiveError(
                f"rank {me}: {op} on the {self.name} group ({members}) failed: {str(e).strip()[:500]} — "
                "a peer in that group died, hung past parallel.timeout_s, or called a different collective; "
                "the launcher's log names the rank that exited first.") from e

    def _traced_group(self) -> dist.ProcessGroup:
        group = self.group if self.group is not None else dist.group.WORLD
        assert group is not None, "a Comm of size > 1 needs a process group"
        return group

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (sum or max) of a contiguous tensor; returns it (traced: a new tensor)."""
        if self.size == 1:
            return t
        if torch.compiler.is_compiling():
            return funcol.all_reduce(t, op, self._traced_group())
        self.stats.add("all_reduce", t)
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        with self._named("all_reduce"):
            dist.all_reduce(t, op=red, group=self.group)
        return t

    def all_reduce_async(self, t: torch.Tensor) -> dist.Work | None:
        """Start an in-place sum all-reduce; returns the handle to wait on (None at size 1)."""
        if self.size == 1:
            return None
        self.stats.add("all_reduce", t)
        return dist.all_reduce(t, group=self.group, async_op=True)

    def reduce_scatter_async(self, out: torch.Tensor, t: torch.Tensor) -> dist.Work | None:
        """Start a sum reduce-scatter of flat `t` into this rank's slice `out`."""
        if self.size == 1:
            out.copy_(t)
            return None
        self.stats.add("reduce_scatter", t)
        return reduce_scatter_flat(out, t, group=self.group, async_op=True)

    def all_gather_async(self, out: torch.Tensor, t: torch.Tensor) -> dist.Work | None:
        """Start gathering every rank's flat `t` into flat `out` (size × t); `t` may be this rank's slice of
        `out` (in place, as ZeRO-1's parameter buffers do). Returns the handle (None at size 1)."""
        if self.size == 1:
            if out.data_ptr() != t.data_ptr():
                out.copy_(t)
            return None
        self.stats.add("all_gather", out)
        return all_gather_flat(out, t, group=self.group, async_op=True)

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's `t` along `dim` (output size × along dim)."""
        if self.size == 1:
            return t
        src = t.movedim(dim, 0).contiguous()
        if torch.compiler.is_compiling():
            # Gathered along dim 0 and moved back here, as below: funcol's own gather_dim≠0 path calls a
            # helper that dynamo refuses to trace on torch 2.11 (a graph break per call).
            return funcol.all_gather_tensor(src, 0, self._traced_group()).movedim(0, dim)
        out = torch.empty((src.shape[0] * self.size, *src.shape[1:]), dtype=src.dtype, device=src.device)
        self.stats.add("all_gather", out)
        with self._named("all_gather"):
            all_gather_flat(out, src, group=self.group)
        return out.movedim(0, dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over ranks, then keep this rank's 1/size slice along `dim`."""
        if self.size == 1:
            return t
        src = t.movedim(dim, 0).contiguous()
        if torch.compiler.is_compiling():  # dim 0, as all_gather
            return funcol.reduce_scatter_tensor(src, "sum", 0, self._traced_group()).movedim(0, dim)
        if src.shape[0] % self.size:
            raise ValueError(f"reduce_scatter: dim {dim} of size {src.shape[0]} is not divisible by {self.size}")
        out = torch.empty((src.shape[0] // self.size, *src.shape[1:]), dtype=src.dtype, device=src.device)
        self.stats.add("reduce_scatter", src)
        with self._named("reduce_scatter"):
            reduce_scatter_flat(out, src, group=self.group)
        return out.movedim(0, dim)

    def split(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's 1/size slice along `dim` (no communication)."""
        if self.size == 1:
            return t
        if t.shape[dim] % self.size:
            raise ValueError(f"split: dim {dim} of size {t.shape[dim]} is not divisible by {self.size}")
        return t.chunk(self.size, dim=dim)[self.rank].contiguous()

    def broadcast(self, t: torch.Tensor, src_group_rank: int = 0) -> torch.Tensor:
        if self.size == 1:
            return t
        self.stats.add("broadcast", t)
        with self._named("broadcast"):
            dist.broadcast(t, group=self.group, group_src=src_group_rank)
        return t

    def batch_p2p(self, ops: list[P2POp]) -> P2PWork:
        """Post point-to-point ops (group ranks) as one batch; returns its handle. Both ends must post
        the messages of a pair in the same order, whatever their tags (distributed/p2p.py)."""
        for op in ops:
            if op.kind == "send":
                self.stats.add("send", op.tensor)
        return P2PWork(list(self.p2p_transport.post(self, ops)), ops, self._named)

    def warm_up_p2p(self, device: torch.device) -> None:
        """Once per group, before its first batch_p2p: a tiny all-reduce, so that every member creates
        the group's NCCL communicator together (torch leaves batched p2p among a subset of a group
        undefined when it is the group's first call). Collective over the group."""
        if self.size > 1 and not getattr(self, "_p2p_warm", False):
            self.all_reduce(torch.zeros(1, device=device))
            self._p2p_warm = True

    def all_to_all(self, t: torch.Tensor, out_splits: list[int], in_splits: list[int],
                   op: str = "all_to_all") -> torch.Tensor:
        """Variable-size all-to-all along dim 0: rows [sum(in_splits[:r]), +in_splits[r]) of `t` go to group
        rank r; the result holds what every rank sent here, in rank order (out_splits[r] rows from rank r).
        `op` names the payload in `stats` (token dispatch vs. its count exchange)."""
        if self.size == 1:
            return t
        src = t.contiguous()
        out = torch.empty((sum(out_splits), *src.shape[1:]), dtype=src.dtype, device=src.device)
        self.stats.add(op, src)
        with self._named(op):
            dist.all_to_all_single(out, src, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                   group=self.group)
        return out

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's picklable `obj` (small metadata only: checkpoint key lists and the like)."""
        if self.size == 1:
            return [obj]
        out: list[object] = [None] * self.size
        with self._named("all_gather_object"):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            with self._named("barrier"):
                dist.barrier(group=self.group)
