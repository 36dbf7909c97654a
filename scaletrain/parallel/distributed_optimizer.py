"""AdamW on fp32 main parameters: ZeRO-1 (`optim.distributed = true`), and bf16 weights with or without it.

Each gradient bucket (see data_parallel.py) is padded to a multiple of dp and split into dp equal
contiguous shards; dp rank r owns shard r. Backward reduce-scatters each bucket (instead of
all-reducing it), so a rank receives the summed gradient of its shard only; AdamW updates the fp32
main copy of that shard; the updated shards are written into the (bf16 or fp32) parameters, which are
views of the bucket's parameter buffer, and all-gathered there — under the next forward with
parallel.overlap_param_gather. A shard may cut through parameters: it is kept as *segments*
(parameter, start, length), which is also what weight decay (matrices only), sequence-parallel
reductions and the gradient norm use.

Without ZeRO (bf16 weights, optim.distributed = false) the "shard" is the whole bucket: every rank keeps
fp32 main weights and AdamW state for all its parameters and writes the update straight into them.

Checkpoints stay layout-independent: `full_state()` gathers each parameter's exp_avg / exp_avg_sq
over dp into the same per-parameter form the plain optimizer saves — plus, for bf16 weights, the fp32
master weights as `main_param` — and `load_full_state()` takes this rank's segments back out of it.
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
    """AdamW on fp32 main shards (ZeRO-1 over dp × cp, or whole buckets); the interface the train step needs:
    step(), param_groups."""

    def __init__(self, model: torch.nn.Module, buckets: GradBuckets, cfg: OptimConfig, dp: Comm,
                 fused: bool = False) -> None:
        self.buckets, self.dp = buckets, dp
        names = {id(p): n for n, p in model.named_parameters()}
        self.segments: list[Segment] = []
        for bi, bucket in enumerate(buckets.buckets):
            lo, hi = bucket.shard_range(buckets.comm_of(bucket).rank)  # dp × cp, or edp for routed experts
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
        # fused: torch's fused AdamW kernel where CUDA has it (one launch for every shard); foreach elsewhere.
        self.inner = torch.optim.AdamW([g for g in groups if g["params"]] or [{"params": []}], lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                       fused=fused or None, foreach=None if fused else True)
        self.keeps_master = any(s.main.dtype != s.param.dtype for s in self.segments)

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
        """AdamW on this rank's shards; the updated shards go into the model parameters (ZeRO-1: then
        all-gathered, now or under the next forward)."""
        self.inner.step()
        for s in self.segments:
            s.param.detach().view(-1)[s.start : s.start + s.length].copy_(s.main)
        self.buckets.params_updated()

    # -- checkpoints ------------------------------------------------------------------------
    @torch.no_grad()
    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{param name: {'step', 'exp_avg', 'exp_avg_sq'[, 'main_param']}} with full local shapes (collective
        over dp). `main_param`: the fp32 master weights, where the parameters are bf16."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        keys = ("exp_avg", "exp_avg_sq") + (("main_param",) if self.keeps_master else ())
        for key in keys:
            for bi, bucket in enumerate(self.buckets.buckets):
                comm = self.buckets.comm_of(bucket)
                lo, hi = bucket.shard_range(comm.rank)
                local = torch.zeros(hi - lo, dtype=bucket.buffer.dtype, device=bucket.buffer.device)
                for s in self.segments:
                    if s.bucket == bi and s.main in self.inner.state:
                        value = s.main.detach() if key == "main_param" else self.inner.state[s.main][key]
                        local[s.shard_offset : s.shard_offset + s.length] = value
                full = comm.all_gather(local) if bucket.shards > 1 else local
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
            if "main_param" in state[s.name]:  # the fp32 master weights (bf16 parameters)
                s.main.copy_(state[s.name]["main_param"].reshape(-1)[s.start : s.start + s.length])
            else:
                s.main.copy_(s.param.detach().reshape(-1)[s.start : s.start + s.length])

    @torch.no_grad()
    def reload_main_params(self) -> None:
        """Refresh the fp32 main copies from the model parameters (after they were loaded)."""
        for s in self.segments:
            s.main.copy_(s.param.detach().reshape(-1)[s.start : s.start + s.length])

    def materialize(self) -> None:
        materialize_optimizer_state(self.inner)
