"""One optimizer step, shared by every stage (DESIGN rule 5), and the validation pass.

Loss normalisation lives here and only here: the objective counts its loss items per microbatch,
the step sums them over the whole global batch (all microbatches, all dp ranks) and
the schedule divides every microbatch's summed loss by that one number before backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from scaletrain.distributed.dims import ParallelDims
from scaletrain.parallel.context_parallel import shard_microbatch
from scaletrain.parallel.distributed_optimizer import DistributedOptimizer
from scaletrain.parallel.grads import finalize_grads, global_grad_norm, reduce_tied_embedding
from scaletrain.parallel.pipeline.schedules import forward_backward_pipelining
from scaletrain.parallel.schedules import forward_backward_no_pipelining
from scaletrain.profile.phases import phase
from scaletrain.trainer.contracts import Objective
from scaletrain.trainer.moe_step import MoEStep
from scaletrain.trainer.precision import Precision


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    items: int
    skipped: bool
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's, means over the batch's items


def run_schedule(objective: Objective, microbatches: list[dict], model: torch.nn.Module, dims: ParallelDims, *,
                 normaliser: float, forward_only: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """The schedule this layout needs; returns, on every rank, the global batch's normalised loss and
    the means over its items of the objective's metrics (`objective.metrics` names them)."""
    chunks = getattr(model, "pipeline_chunks", None)
    buckets = None if forward_only else getattr(model, "grad_buckets", None)
    device = next(model.parameters()).device
    if chunks is None:
        loss, sums = forward_backward_no_pipelining(objective.forward_step, microbatches, model,
                                                    normaliser=normaliser, forward_only=forward_only)
    else:
        loss, sums = forward_backward_pipelining(objective.forward_step, microbatches, chunks, dims,
                                                 normaliser=normaliser, forward_only=forward_only)
    if not forward_only:  # the tied embedding's pipeline copies sum their full grads before the dp reduction
        reduce_tied_embedding(list(model.parameters()), dims)
    if buckets is not None:
        buckets.finish()  # the buckets not already reducing (overlap: most started during the last backward)
    # Loss and metric sums travel as one vector. Only the last pipeline stage computed them (the
    # others hold zeros, so a pp sum shares them), and each dp (and cp) rank holds its share of the batch.
    names = objective.metrics
    vec = torch.stack([torch.as_tensor(t).detach().reshape(()).to(device, torch.float64)
                       for t in [loss, *(sums.get(k, 0.0) for k in names)]])
    if chunks is not None:
        vec = dims.comm("pp").all_reduce(vec)
    if dims.dp * dims.cp > 1:
        vec = dims.comm("dp_cp").all_reduce(vec)
    vec = vec.cpu()  # one host sync per step (the loss is logged)
    return vec[0], {k: float(v) / normaliser for k, v in zip(names, vec[1:].tolist())}


@torch.no_grad()
def forward_pass(forward_step, microbatches: list[dict], model: torch.nn.Module, dims: ParallelDims) -> None:
    """Forward only, through this layout's schedule, with no reduction of anything: for passes whose
    loss_fn records what it needs on the last pipeline stage (rollout logits, reference log-probs).
    Collective over tp and pp only, so each dp replica may run as many passes as it needs."""
    chunks = getattr(model, "pipeline_chunks", None)
    if chunks is None:
        forward_backward_no_pipelining(forward_step, microbatches, model, normaliser=1.0, forward_only=True)
    else:
        forward_backward_pipelining(forward_step, microbatches, chunks, dims, normaliser=1.0, forward_only=True)


def prepare_batches(objective: Objective, microbatches: list[dict], device: torch.device,
                    dims: ParallelDims) -> list[dict]:
    """Microbatches on the device, in the layout the objective's model input needs: the objective's
    `prepare(batch)` (DPO stacks chosen and rejected rows into one `tokens` [2M, s]); under
    context parallelism each row is then cut to this cp rank's share (parallel/context_parallel.py);
    last, `annotate(microbatches)` (a collective pass that adds to them: a distillation teacher's
    outputs). Every schedule reads `tokens` for the activation shape."""
    mbs = [objective.prepare(_to_device(b, device)) for b in microbatches]
    if dims.cp > 1:

        mbs = [shard_microbatch(b, dims.comm("cp")) for b in mbs]
    objective.annotate(mbs)  # e.g. distillation: the teacher's outputs, stored in the microbatches
    return mbs


def _global_count(objective: Objective, mbs: list[dict], dims: ParallelDims) -> int:
    """The normaliser: loss items of the whole global batch, summed over microbatches and dp (and cp) ranks."""
    count = torch.stack([objective.count(b) for b in mbs]).sum().reshape(1).to(torch.float64)
    if dims.dp * dims.cp > 1:
        device = mbs[0]["tokens"].device
        count = dims.comm("dp_cp").all_reduce(count.to(device))
    return int(count.item())  # host sync: the normaliser is needed as a number


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | DistributedOptimizer, objective: Objective,
               microbatches: list[dict],
               *, lr: float, clip_grad: float, precision: Precision, device: torch.device,
               dims: ParallelDims) -> StepResult:
    """Forward/backward over `microbatches`, clip the global grad norm, AdamW update.

    A non-finite gradient norm skips the update (and is reported), so one bad batch cannot poison
    the weights.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    mbs = prepare_batches(objective, microbatches, device, dims)
    items = _global_count(objective, mbs, dims)
    moe = MoEStep.of(model, dims)  # MoE layers: their balancing terms enter the loss here (trainer/moe_step.py)
    if moe is not None:
        moe.begin(mbs)
    buckets = getattr(model, "grad_buckets", None)
    if buckets is not None:
        # .grad / main_grad are views into the dp buckets: zeroed in place, never dropped. Every parameter's
        # gradient is final after one backward per microbatch; its bucket's reduction starts there.
        buckets.start_step(len(mbs))
    else:
        optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
    with precision.autocast():
        loss, metrics = run_schedule(objective, mbs, model, dims, normaliser=max(items, 1))
    if moe is not None:
        metrics = {**metrics, **moe.end()}
    zero = isinstance(optimizer, DistributedOptimizer) and optimizer.buckets.shard
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.attach_grads()  # this rank's (ZeRO-1: reduce-scattered) shard, as fp32 segments
        pairs = [(s.param, s.main.grad) for s in optimizer.segments if s.main.grad is not None]
    else:
        pairs = [(p, p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    with phase("grad_finalize"):
        finalize_grads(pairs, dims)  # type: ignore[arg-type]
        total_norm = global_grad_norm(pairs, dims, sharded_over_dp=bool(zero))  # type: ignore[arg-type]
        grad_norm = float(total_norm.item())  # host sync, once per step
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        if clip_grad > 0 and pairs:
            coef = torch.clamp(clip_grad / (total_norm + 1e-6), max=1.0)
            torch._foreach_mul_([g for _, g in pairs], coef.to(pairs[0][1].dtype))  # type: ignore[misc]
        with phase("optimizer"):
            optimizer.step()
        if moe is not None:
            moe.update_bias()
    return StepResult(loss=float(loss.item()), grad_norm=grad_norm, items=items, skipped=skipped, metrics=metrics)


@torch.no_grad()
def evaluate(model: torch.nn.Module, objective: Objective, batches, *, precision: Precision, device: torch.device,
             dims: ParallelDims) -> tuple[float, dict[str, float]]:
    """Mean loss, and means of the objective's metrics, over all items of `batches` (an iterable of
    per-step microbatch lists)."""
    was_training = model.training
    model.eval()
    total, items = 0.0, 0
    sums: dict[str, float] = {}
    for microbatches in batches:
        mbs = prepare_batches(objective, microbatches, device, dims)
        count = _global_count(objective, mbs, dims)
        with precision.autocast():
            loss, metrics = run_schedule(objective, mbs, model, dims, normaliser=max(count, 1), forward_only=True)
        total += float(loss.item()) * count
        items += count
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * count
    model.train(was_training)
    return total / max(items, 1), {k: v / max(items, 1) for k, v in sums.items()}
