"""parallelize(model, dims, cfg, device): the one place that turns a built model into a parallel one
(DESIGN rule 2).

Order: (1) split pipeline stages — prune the (meta-device) model to this rank's layers;
(2) materialise on the device (only what this rank runs is ever allocated); (3) bind the tp
communicator and sequence parallelism to every role layer and tag the parameters whose gradients
need a reduction (SP norm weights over tp, tied-embedding copies over the embedding group).
(4) data parallelism: bucketed gradient all-reduce hooks (`model.grad_buckets`).
Still to come, between (3) and (4): activation recomputation and torch.compile.
"""

from __future__ import annotations

import torch

from scaletrain.config.schema import ParallelConfig
from scaletrain.distributed.dims import ParallelDims
from scaletrain.nn.fused import enable_kernels
from scaletrain.nn.init import spec_of
from scaletrain.nn.linear import TPBound
from scaletrain.nn.norm import RMSNorm
from scaletrain.parallel.data_parallel import GradBuckets
from scaletrain.parallel.pipeline.split import mark_tied_embedding, split_stages


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model on `device` (uninitialised) keeping every ParamSpec."""
    specs = {name: spec_of(p) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        p.scaletrain_spec = specs[name]  # type: ignore[attr-defined]
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if reset is not None:
            reset()


def apply_full_recompute(model: torch.nn.Module) -> None:
    """Full activation recomputation: each transformer block keeps only its input for backward and
    reruns its forward there (tensor-parallel collectives included). The block's forward is wrapped
    on the instance, so parameter names — and with them checkpoints — do not change."""
    import functools

    from torch.utils.checkpoint import checkpoint

    def run(forward, *args, **kwargs):
        if not torch.is_grad_enabled():  # validation / generation: nothing to save
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    for block in getattr(model, "layers", {}).values():
        block.forward = functools.partial(run, block.forward)


def parallelize(model: torch.nn.Module, dims: ParallelDims, cfg: ParallelConfig,
                device: torch.device | None = None, *, shard_optimizer: bool = False) -> torch.nn.Module:
    """Apply the parallel layout in place and return the model. Order: pipeline split, materialise,
    bind tp/SP, tied-embedding tags, activation recomputation, data-parallel gradient buckets.

    With pp > 1 the model is pruned to this rank's stage and `model.pipeline_chunks` lists its
    virtual stages for the schedule. Under sequence parallelism each tp rank normalises a
    different slice of the sequence, so RMSNorm weights (replicated over tp) get partial gradients:
    they are tagged `sequence_parallel_grad` and summed over tp by `finalize_grads`.
    """
    sp = cfg.sequence_parallel and dims.tp > 1
    if dims.pp > 1:
        model.pipeline_chunks = split_stages(model, dims, sp)  # type: ignore[assignment]
    if any(p.is_meta for p in model.parameters()):
        materialize(model, device or torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, TPBound):
            module.bind_tp(dims.tp_comm, sp)
        if sp and isinstance(module, RMSNorm):
            module.weight.sequence_parallel_grad = True  # type: ignore[attr-defined]
    mark_tied_embedding(model, dims)
    if cfg.kernels:
        enable_kernels(model, cfg.kernels)
    if cfg.recompute == "full":
        apply_full_recompute(model)
    if dims.dp > 1:
        # ZeRO-1 reduce-scatters the buckets instead of all-reducing them.
        model.grad_buckets = GradBuckets(model, dims.comm("dp"), shard=shard_optimizer)  # type: ignore[assignment]
    return model
