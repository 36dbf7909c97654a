"""Data parallelism: gradients in contiguous buckets, each all-reduced over dp as soon as it is ready.

Every parameter's `.grad` is a view into one flat buffer per bucket (buckets fill in reverse
registration order, roughly the order backward produces gradients). A post-accumulate-grad hook
counts the gradients of a bucket; when the last one lands during the final microbatch's backward,
the bucket's all-reduce starts asynchronously, overlapping the rest of backward on GPUs (on gloo/CPU
the same code runs, with little to overlap). `finish()` launches what is left (buckets with unused
parameters, or everything under pipeline schedules, which sync after the schedule) and waits.

Gradients are *summed* over dp: every rank's loss is already divided by the global token count, so
the sum is the gradient of the global mean (the "average" of per-rank means, weighted correctly).

With `shard=True` (ZeRO-1, see distributed_optimizer.py) buffers are padded to a multiple of dp and
reduce-scattered: each rank receives only the summed gradient of its 1/dp shard (`shard_grad`).

Expert parallelism: routed-expert weights (`nn.init.expert_sharded`) differ between the ep ranks, so
they sit in buckets of their own, reduced (or ZeRO-sharded) over the expert-data-parallel group
(`expert_comm`, dims.comm('edp')) instead of dp × cp; every bucket carries the group it is reduced over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaletrain.distributed.comm import Comm
from scaletrain.nn.init import expert_sharded
from scaletrain.profile.phases import phase


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    names: list[str]
    buffer: torch.Tensor  # flat gradients (padded to a multiple of dp when sharded)
    numel: int  # unpadded
    ready: int = 0
    work: object | None = None
    shard_grad: torch.Tensor | None = None  # ZeRO: this rank's reduce-scattered slice
    comm: Comm | None = None  # the group this bucket is reduced over (dp × cp, or edp for experts)

    def shard_range(self, rank: int) -> tuple[int, int]:
        per = self.buffer.numel() // self._dp
        return rank * per, (rank + 1) * per

    _dp: int = 1

    def param_shard(self) -> torch.Tensor:
        """This rank's slice of the bucket's parameters, flattened and padded like the buffer."""
        flat = torch.zeros_like(self.buffer)
        offset = 0
        for p in self.params:
            flat[offset : offset + p.numel()] = p.detach().reshape(-1)
            offset += p.numel()
        return flat

    @torch.no_grad()
    def gather_params(self, dp: Comm, padded_params: torch.Tensor) -> None:
        """All-gather every rank's updated shard (taken from `padded_params`) into the parameters."""
        lo, hi = self.shard_range(dp.rank)
        full = dp.all_gather(padded_params[lo:hi].contiguous())
        offset = 0
        for p in self.params:
            p.copy_(full[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


class GradBuckets:
    """Bucketed dp gradient reduction for the parameters of one rank's model."""

    def __init__(self, model: torch.nn.Module, dp: Comm, bucket_bytes: int = 25 * 2**20, shard: bool = False,
                 expert_comm: Comm | None = None) -> None:
        self.dp, self.shard = dp, shard
        self.sync_enabled = True
        params: list[torch.nn.Parameter] = []
        self._names: dict[int, str] = {}
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in self._names:
                self._names[id(p)] = name
                params.append(p)
        self.buckets: list[_Bucket] = []
        experts = [p for p in params if expert_sharded(p)] if expert_comm is not None else []
        for comm, members in ((dp, [p for p in params if not any(p is e for e in experts)]), (expert_comm, experts)):
            group: list[torch.nn.Parameter] = []
            size = 0
            for p in reversed(members):  # ≈ the order backward finishes gradients
                group.append(p)
                size += p.numel() * p.element_size()
                if size >= bucket_bytes:
                    self._make_bucket(group, comm)  # type: ignore[arg-type]
                    group, size = [], 0
            if group:
                self._make_bucket(group, comm)  # type: ignore[arg-type]
        self._owner = {id(p): b for b in self.buckets for p in b.params}
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _make_bucket(self, params: list[torch.nn.Parameter], comm: Comm) -> None:
        p0 = params[0]
        numel = sum(p.numel() for p in params)
        padded = -(-numel // comm.size) * comm.size if self.shard else numel
        buffer = torch.zeros(padded, dtype=p0.dtype, device=p0.device)
        offset = 0
        for p in params:
            p.grad = buffer[offset : offset + p.numel()].view_as(p)  # autograd accumulates in place
            offset += p.numel()
        self.buckets.append(_Bucket(params, [self._names[id(p)] for p in params], buffer, numel,
                                    comm=comm, _dp=comm.size if self.shard else 1))

    def _launch(self, b: _Bucket) -> None:
        comm = b.comm or self.dp
        if self.shard:
            b.shard_grad = torch.empty(b.buffer.numel() // comm.size, dtype=b.buffer.dtype, device=b.buffer.device)
            b.work = comm.reduce_scatter_async(b.shard_grad, b.buffer)
        else:
            b.work = comm.all_reduce_async(b.buffer)

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if not self.sync_enabled:
            return
        bucket = self._owner[id(p)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params) and bucket.work is None:
            self._launch(bucket)

    def finish(self) -> None:
        """Make sure every bucket is reduced; wait for all of them."""
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        with phase("comm.dp_wait"):  # what the overlap with backward did not hide
            for b in self.buckets:
                if b.work is not None:
                    b.work.wait()  # type: ignore[attr-defined]
                b.work, b.ready = None, 0

    def zero(self) -> None:
        """Zero the gradient buffers in place (the .grad views must survive; never set them to None)."""
        for b in self.buckets:
            b.buffer.zero_()
            b.ready = 0
