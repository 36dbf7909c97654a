"""ZeRO-1: AdamW state and fp32 main parameters sharded over dp (`optim.distributed = true`).

Each gradient bucket (see data_parallel.py) is padded to a multiple of dp and split into dp equal
contiguous shards; dp rank r owns shard r. Backward reduce-scatters each bucket (instead of
all-reducing it), so a rank receives the summed gradient of its shard only; AdamW updates the fp32
main copy of that shard; the updated shards are all-gathered back into the model parameters.
A shard may cut through parameters: it is kept as *segments* (parameter, start, length), which is
also what weight decay (matrices only), sequence-parallel reductions and the gradient norm use.

Checkpoints stay layout-independent: `full_state()` gathers each parameter's exp_avg / exp_avg_sq
over dp into the same per-parameter form the plain optimizer saves, and `load_full_state()` takes
this rank's segments back out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scaletrain.config.schema import OptimConfig
from scaletrain.distributed.comm import Comm
from scaletrain.parallel.data_parallel import GradBuckets


@torch.no_grad()
def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create an optimizer's state tensors (so a checkpoint can be loaded into them) with an lr = 0 step
    on zero gradients — a no-op on the parameters — keeping whatever `.grad` tensors exist (data
    parallelism's bucket views: DCP's own initialiser skips optimizers whose params have grads, and
    drops grads when it runs)."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    kept = [p.grad for p in params]
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p, grad in zip(params, kept):
        p.grad = grad


@dataclass
class Segment:
    """The part [start, start + length) of `param`'s flattened elements that this rank owns."""

    param: torch.nn.Parameter
    name: str
    start: int
    length: int
    bucket: int
    shard_offset: int  # where the segment begins inside this rank's shard of the bucket
    main: torch.Tensor  # fp32 (or float64) master copy, a leaf the optimizer updates

    @property
    def grad(self) -> torch.Tensor | None:
        return self.main.grad


class DistributedOptimizer:
    """Sharded AdamW over the dp group; the interface the train step needs: step(), param_groups."""

    def __init__(self, model: torch.nn.Module, buckets: GradBuckets, cfg: OptimConfig, dp: Comm) -> None:
        self.buckets, self.dp = buckets, dp
        names = {id(p): n for n, p in model.named_parameters()}
        self.segments: list[Segment] = []
        for bi, bucket in enumerate(buckets.buckets):
            lo, hi = bucket.shard_range(self._comm(bucket).rank)
            offset = 0
            for p in bucket.params:
                s, e = max(lo, offset), min(hi, offset + p.numel())
                if s < e:
                    main_dtype = torch.promote_types(p.dtype, torch.float32)
                    main = p.detach().reshape(-1)[s - offset : e - offset].to(main_dtype).clone().requires_grad_()
                    self.segments.append(Segment(p, names[id(p)], s - offset, e - s, bi, s - lo, main))
                offset += p.numel()
        decay = [s.main for s in self.segments if s.param.ndim >= 2]
        no_decay = [s.main for s in self.segments if s.param.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.inner = torch.optim.AdamW([g for g in groups if g["params"]] or [{"params": []}], lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)

    def _comm(self, bucket) -> Comm:
        """The group a bucket is sharded over: dp × cp, or the expert-data-parallel group for experts."""
        return bucket.comm or self.dp

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def attach_grads(self) -> None:
        """Point every segment's grad at its slice of the reduce-scattered bucket shard."""
        for s in self.segments:
            shard = self.buckets.buckets[s.bucket].shard_grad
            assert shard is not None
            s.main.grad = shard[s.shard_offset : s.shard_offset + s.length].to(s.main.dtype)

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's shards, then all-gather the updated shards into the model parameters."""
        self.inner.step()
        for bi, bucket in enumerate(self.buckets.buckets):
            lo, _hi = bucket.shard_range(self._comm(bucket).rank)
            flat = bucket.param_shard()  # the bucket's parameters, flat and padded
            for s in self.segments:
                if s.bucket == bi:
                    flat[lo + s.shard_offset : lo + s.shard_offset + s.length] = s.main.to(flat.dtype)
            bucket.gather_params(self._comm(bucket), flat)

    # -- checkpoints ------------------------------------------------------------------------
    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{param name: {'step', 'exp_avg', 'exp_avg_sq'}} with full local shapes (collective over dp)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key in ("exp_avg", "exp_avg_sq"):
            for bi, bucket in enumerate(self.buckets.buckets):
                lo, hi = bucket.shard_range(self._comm(bucket).rank)
                local = torch.zeros(hi - lo, dtype=torch.promote_types(bucket.buffer.dtype, torch.float32),
                                    device=bucket.buffer.device)
                for s in self.segments:
                    if s.bucket == bi and s.main in self.inner.state:
                        local[s.shard_offset : s.shard_offset + s.length] = self.inner.state[s.main][key]
                full = self._comm(bucket).all_gather(local)
                offset = 0
                for p, name in zip(bucket.params, bucket.names):
                    out.setdefault(name, {})[key] = full[offset : offset + p.numel()].view_as(p).clone()
                    offset += p.numel()
        step = next((st["step"] for st in self.inner.state.values()), torch.tensor(0.0))
        for name in out:
            out[name]["step"] = step.clone()
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.materialize()
        for s in self.segments:
            st = self.inner.state[s.main]
            for key in ("exp_avg", "exp_avg_sq"):
                st[key].copy_(state[s.name][key].reshape(-1)[s.start : s.start + s.length])
            st["step"].copy_(state[s.name]["step"])
        self.reload_main_params()

    @torch.no_grad()
    def reload_main_params(self) -> None:
        """Refresh the fp32 main copies from the model parameters (after they were loaded)."""
        for s in self.segments:
            s.main.copy_(s.param.detach().reshape(-1)[s.start : s.start + s.length])

    def materialize(self) -> None:
        materialize_optimizer_state(self.inner)
