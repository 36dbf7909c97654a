"""Data parallelism: gradients in contiguous buckets, each reduced over dp as soon as it is ready.

Every parameter's gradient lives in one flat buffer per bucket (buckets fill in reverse registration
order, roughly the order backward produces gradients), in the *main* dtype: the parameter's own for
float32/float64 weights — `.grad` is then a view into the buffer and autograd accumulates in place — and
float32 for bf16 weights (Megatron's main grads): `param.main_grad` is the view, and a
post-accumulate-grad hook adds each microbatch's bf16 `.grad` into it and frees it (the fused add where
the backend cannot accumulate the weight-gradient GEMM into fp32 directly).

Overlap (parallel.overlap_grad_reduce): the hook counts each parameter's gradients; when a parameter
has received all of the step's (one per microbatch backward) it is final, and when every parameter of
a bucket is final the bucket's all-reduce (or ZeRO-1 reduce-scatter) starts asynchronously — during
the last microbatch's backward of this rank's stage, whatever the schedule (no pipeline, 1F1B,
interleaved: a chunk's parameters become final at its own last backward). Buckets holding a tied
embedding's pipeline copy wait for `finish()`, which sums the two copies first. `finish()` starts
whatever is left (unused parameters) and waits.

Gradients are *summed* over dp: every rank's loss is already divided by the global token count, so
the sum is the gradient of the global mean (the "average" of per-rank means, weighted correctly).

With `shard=True` (ZeRO-1, see distributed_optimizer.py) buffers are padded to a multiple of dp and
reduce-scattered in place: rank r's slice of the buffer receives the summed gradient of its 1/dp
shard (`shard_grad`). The parameters then are views into one padded *parameter* buffer per bucket, so
that the updated shards are all-gathered straight into them (in place); with
parallel.overlap_param_gather the gather is posted at the start of the next forward, bucket by bucket
in forward order, and each bucket is waited for just before the first layer that reads it.

Expert parallelism: routed-expert weights (`nn.init.expert_sharded`) differ between the ep ranks, so
they sit in buckets of their own, reduced (or ZeRO-sharded) over the expert-data-parallel group
(`expert_comm`, dims.comm('edp')) instead of dp × cp; every bucket carries the group it is reduced over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scaletrain.distributed.comm import Comm
from scaletrain.nn.init import expert_sharded
from scaletrain.profile.phases import mark, phase


@dataclass
class _Bucket:
    index: int
    params: list[torch.nn.Parameter]
    names: list[str]
    buffer: torch.Tensor  # flat gradients in the main dtype (padded to a multiple of dp when sharded)
    numel: int  # unpadded
    shards: int = 1  # dp when sharded, else 1
    deferred: bool = False  # holds a pipeline-tied embedding copy: reduced after the copies are summed
    ready: int = 0
    work: object | None = None
    shard_grad: torch.Tensor | None = None  # this rank's reduced slice (a view of `buffer`)
    param_buffer: torch.Tensor | None = None  # ZeRO-1: the parameters' storage (padded like `buffer`)
    gather_work: object | None = None
    offsets: list[int] = field(default_factory=list)
    comm: Comm | None = None  # the group this bucket is reduced over (dp × cp, or edp for routed experts)

    def shard_range(self, rank: int) -> tuple[int, int]:
        """[lo, hi) of this rank's shard in the flat buffers (the whole buffer when not sharded)."""
        per = self.buffer.numel() // self.shards
        r = rank if self.shards > 1 else 0
        return r * per, (r + 1) * per


class GradBuckets:
    """Bucketed dp gradient reduction (and ZeRO-1 parameter gathering) for one rank's model."""

    def __init__(self, model: torch.nn.Module, dp: Comm, bucket_bytes: int = 25 * 2**20, shard: bool = False,
                 overlap_grad_reduce: bool = True, overlap_param_gather: bool = True,
                 expert_comm: Comm | None = None) -> None:
        self.dp, self.shard = dp, shard
        self.overlap_grad_reduce, self.overlap_param_gather = overlap_grad_reduce, overlap_param_gather
        self.expected = 1  # gradients each parameter receives this step (microbatches); set by start_step
        params: list[torch.nn.Parameter] = []
        self._names: dict[int, str] = {}
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in self._names:
                self._names[id(p)] = name
                params.append(p)
        self.main_grads = any(torch.promote_types(p.dtype, torch.float32) != p.dtype for p in params)
        self.buckets: list[_Bucket] = []
        experts = {id(p) for p in params if expert_sharded(p)} if expert_comm is not None else set()
        for comm, members in ((dp, [p for p in params if id(p) not in experts]),
                              (expert_comm, [p for p in params if id(p) in experts])):
            group: list[torch.nn.Parameter] = []
            size = 0
            for p in reversed(members):  # ≈ the order backward finishes gradients
                group.append(p)
                size += p.numel() * torch.promote_types(p.dtype, torch.float32).itemsize
                if size >= bucket_bytes:
                    self._make_bucket(group, comm)  # type: ignore[arg-type]
                    group, size = [], 0
            if group:
                self._make_bucket(group, comm)  # type: ignore[arg-type]
        self._owner = {id(p): b for b in self.buckets for p in b.params}
        self._arrived: dict[int, int] = {id(p): 0 for p in params}
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._gather_pending = False
        if shard and dp.size > 1:
            self._hook_forwards(model)

    # -- layout ---------------------------------------------------------------------------------
    def _make_bucket(self, params: list[torch.nn.Parameter], comm: Comm) -> None:
        p0 = params[0]
        main = torch.promote_types(p0.dtype, torch.float32)
        numel = sum(p.numel() for p in params)
        shards = comm.size if self.shard else 1
        padded = -(-numel // shards) * shards
        buffer = torch.zeros(padded, dtype=main, device=p0.device)
        param_buffer = torch.zeros(padded, dtype=p0.dtype, device=p0.device) if self.shard and comm.size > 1 else None
        offsets, offset = [], 0
        for p in params:
            offsets.append(offset)
            view = buffer[offset : offset + p.numel()].view_as(p)
            if p.dtype == main:
                p.grad = view  # autograd accumulates in place
            else:
                p.main_grad = view  # type: ignore[attr-defined]  # the hook adds each bf16 .grad into it
            if param_buffer is not None:  # the parameter becomes a view of the bucket's parameter storage
                dst = param_buffer[offset : offset + p.numel()].view_as(p)
                dst.copy_(p.detach())
                p.data = dst
            offset += p.numel()
        deferred = any(getattr(p, "pipeline_tied", False) for p in params)
        self.buckets.append(_Bucket(len(self.buckets), params, [self._names[id(p)] for p in params], buffer, numel,
                                    shards, deferred, param_buffer=param_buffer, offsets=offsets, comm=comm))

    # -- gradients --------------------------------------------------------------------------------
    def start_step(self, num_microbatches: int) -> None:
        """Zero the buffers for a new step whose backward runs `num_microbatches` times on this rank."""
        self.zero()
        self.expected = max(num_microbatches, 1)

    def comm_of(self, b: _Bucket) -> Comm:
        """The group bucket `b` is reduced (and ZeRO-sharded) over."""
        return b.comm or self.dp

    def _launch(self, b: _Bucket) -> None:
        comm = self.comm_of(b)
        if self.shard and comm.size > 1:
            lo, hi = b.shard_range(comm.rank)
            b.shard_grad = b.buffer[lo:hi]
            mark(f"dp.reduce_scatter.post[{b.index}]")
            b.work = comm.reduce_scatter_async(b.shard_grad, b.buffer)  # in place: into this rank's slice
        else:
            b.shard_grad = b.buffer
            mark(f"dp.all_reduce.post[{b.index}]")
            b.work = comm.all_reduce_async(b.buffer)
        if b.work is None:  # size 1: nothing to wait for; a marker so the bucket counts as launched
            b.work = _DONE

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        main = getattr(p, "main_grad", None)
        if main is not None and p.grad is not None:
            main.add_(p.grad)  # fp32 += bf16 (the microbatch's weight gradient), then free the bf16 copy
            p.grad = None
        key = id(p)
        self._arrived[key] += 1
        if self._arrived[key] != self.expected:
            if self._arrived[key] > self.expected and self._owner[key].work is not None:
                raise RuntimeError(f"parameter {self._names[key]} received gradient {self._arrived[key]} of a step of "
                                   f"{self.expected} microbatches after its bucket's reduction started: a forward_step "
                                   "that runs backward more than once per microbatch needs parallel.overlap_grad_reduce "
                                   "= false")
            return
        bucket = self._owner[key]
        bucket.ready += 1
        if (bucket.ready == len(bucket.params) and bucket.work is None and self.overlap_grad_reduce
                and not bucket.deferred):
            self._launch(bucket)

    def finish(self) -> None:
        """Make sure every bucket is reduced (deferred and unused ones start here); wait for all of them."""
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        with phase("comm.dp_wait"):  # what the overlap with backward did not hide
            for b in self.buckets:
                if b.work is not None and b.work is not _DONE:
                    b.work.wait()  # type: ignore[attr-defined]
                b.work, b.ready = None, 0
        for key in self._arrived:
            self._arrived[key] = 0

    def zero(self) -> None:
        """Zero the gradient buffers in place (the views must survive; never set them to None)."""
        for b in self.buckets:
            b.buffer.zero_()
            b.ready, b.work = 0, None
            for p in b.params:
                if hasattr(p, "main_grad"):
                    p.grad = None
        for key in self._arrived:
            self._arrived[key] = 0

    def grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """A parameter's accumulated gradient: its main grad (bf16 weights) or its `.grad`."""
        main = getattr(p, "main_grad", None)
        return main if main is not None else p.grad

    # -- ZeRO-1 parameters ------------------------------------------------------------------------
    def params_updated(self) -> None:
        """Every rank wrote its updated shard into the parameter buffers: gather the rest — under the next
        forward (overlap_param_gather), or now."""
        if not (self.shard and self.dp.size > 1):
            return
        self._gather_pending = True
        if not self.overlap_param_gather:
            self.wait_params()

    def _post_gathers(self) -> None:
        for b in reversed(self.buckets):  # forward order: the first bucket holds the last parameters
            if b.gather_work is None and b.param_buffer is None:  # not sharded (routed experts at edp = 1)
                b.gather_work = _DONE
            elif b.gather_work is None and b.param_buffer is not None:
                comm = self.comm_of(b)
                lo, hi = b.shard_range(comm.rank)
                mark(f"zero.all_gather.post[{b.index}]")
                b.gather_work = comm.all_gather_async(b.param_buffer, b.param_buffer[lo:hi])

    def _wait_gathers(self, buckets: list[_Bucket]) -> None:
        self._post_gathers()
        with phase("comm.zero_param_wait"):
            for b in buckets:
                if b.gather_work is not None and b.gather_work is not _DONE:
                    mark(f"zero.all_gather.wait[{b.index}]")
                    b.gather_work.wait()  # type: ignore[attr-defined]
                    b.gather_work = _DONE
        if all(b.gather_work is _DONE for b in self.buckets):
            for b in self.buckets:
                b.gather_work = None
            self._gather_pending = False

    def wait_params(self) -> None:
        """Complete any pending parameter all-gather (before parameters are read outside a forward)."""
        if self._gather_pending:
            self._wait_gathers(self.buckets)

    def _hook_forwards(self, model: torch.nn.Module) -> None:
        """Forward pre-hooks: the model's forward posts the pending gathers (and waits for parameters no
        unit below covers, e.g. the input embedding); each block, the final norm and the head wait for
        their own buckets, so the gathers of later buckets overlap the compute of earlier layers."""
        units: list[torch.nn.Module] = [*getattr(model, "layers", {}).values()]
        units += [m for m in (getattr(model, n, None) for n in ("norm", "head", "score")) if isinstance(m, torch.nn.Module)]
        covered: set[int] = set()
        for unit in units:
            mine = sorted({self._owner[id(p)].index for p in unit.parameters() if id(p) in self._owner})
            covered |= {id(p) for p in unit.parameters()}
            if mine:
                unit.register_forward_pre_hook(self._unit_hook(mine))
        rest = sorted({b.index for pid, b in self._owner.items() if pid not in covered})
        model.register_forward_pre_hook(self._unit_hook(rest, post=True))
        model.register_state_dict_pre_hook(lambda *args, **kwargs: self.wait_params())

    def _unit_hook(self, indices: list[int], post: bool = False):
        def hook(module, args):
            if self._gather_pending:
                if post:
                    self._post_gathers()
                self._wait_gathers([self.buckets[i] for i in indices])
        return hook


class _Done:
    """Stands for a collective that needed no communication (size 1) or was already waited for."""


_DONE = _Done()
