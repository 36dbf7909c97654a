"""Data parallelism: gradients in contiguous buckets, each all-reduced over dp as soon as it is ready.

Every parameter's `.grad` is a view into one flat buffer per bucket (buckets fill in reverse
registration order, roughly the order backward produces gradients). A post-accumulate-grad hook
counts the gradients of a bucket; when the last one lands during the final microbatch's backward,
the bucket's all-reduce starts asynchronously, overlapping the rest of backward on GPUs (on gloo/CPU
the same code runs, with little to overlap). `finish()` launches what is left (buckets with unused
parameters, or everything under pipeline schedules, which sync after the schedule) and waits.

Gradients are *summed* over dp: every rank's loss is already divided by the global token count, so
the sum is the gradient of the global mean (the "average" of per-rank means, weighted correctly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scaletrain.distributed.comm import Comm


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    buffer: torch.Tensor
    ready: int = 0
    work: object | None = None
    ids: set[int] = field(default_factory=set)


class GradBuckets:
    """Bucketed dp gradient reduction for the parameters of one rank's model."""

    def __init__(self, model: torch.nn.Module, dp: Comm, bucket_bytes: int = 25 * 2**20) -> None:
        self.dp = dp
        self.sync_enabled = True
        params: list[torch.nn.Parameter] = []
        seen: set[int] = set()
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        self.buckets: list[_Bucket] = []
        group: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(params):  # ≈ the order backward finishes gradients
            group.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self._make_bucket(group)
                group, size = [], 0
        if group:
            self._make_bucket(group)
        self._owner = {id(p): b for b in self.buckets for p in b.params}
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _make_bucket(self, params: list[torch.nn.Parameter]) -> None:
        p0 = params[0]
        buffer = torch.zeros(sum(p.numel() for p in params), dtype=p0.dtype, device=p0.device)
        offset = 0
        for p in params:
            p.grad = buffer[offset : offset + p.numel()].view_as(p)  # autograd accumulates in place
            offset += p.numel()
        self.buckets.append(_Bucket(params, buffer, ids={id(p) for p in params}))

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if not self.sync_enabled:
            return
        bucket = self._owner[id(p)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params) and bucket.work is None:
            bucket.work = self.dp.all_reduce_async(bucket.buffer)

    def finish(self) -> None:
        """Make sure every bucket is reduced; wait for all of them."""
        for b in self.buckets:
            if b.work is None:
                b.work = self.dp.all_reduce_async(b.buffer)
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()  # type: ignore[attr-defined]
            b.work, b.ready = None, 0

    def zero(self) -> None:
        """Zero the gradient buffers in place (the .grad views must survive; never set them to None)."""
        for b in self.buckets:
            b.buffer.zero_()
            b.ready = 0
