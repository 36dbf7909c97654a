"""AdamW with decoupled weight decay on matrices only (never on norms and biases)."""

from __future__ import annotations

import torch

from scaletrain.config.schema import OptimConfig
from scaletrain.distributed.dims import ParallelDims
from scaletrain.parallel.distributed_optimizer import DistributedOptimizer


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: ≥2-D weights (decayed) and 1-D parameters — norm weights, biases (not decayed)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


IMPLS = ("torch", "te", "apex")


def optimizer_problem(cfg: OptimConfig, device_type: str) -> str | None:
    """Why optim.impl cannot run here (None when it can): checked before any heavy work."""
    if cfg.impl == "torch":
        return None
    if cfg.impl not in IMPLS:
        return f"optim.impl = {cfg.impl!r}: choose one of {', '.join(IMPLS)}."
    if device_type != "cuda":
        return f"optim.impl = '{cfg.impl}' is a CUDA kernel and this run is on {device_type}; use 'torch'."
    if cfg.distributed:
        return f"optim.impl = '{cfg.impl}' with optim.distributed: ZeRO-1 runs torch's AdamW on its shards; use 'torch'."
    try:
        if cfg.impl == "te":
            from transformer_engine.pytorch.optimizers import FusedAdam  # noqa: F401
        else:
            from apex.optimizers import FusedAdam  # type: ignore[no-redef]  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA extension
        where = ("pip install -e '.[gpu]'" if cfg.impl == "te" else
                 "NVIDIA apex is not on PyPI (the PyPI 'apex' is another project); build it from github.com/NVIDIA/apex")
        return f"optim.impl = '{cfg.impl}': cannot import its FusedAdam ({type(e).__name__}: {e}); {where}."
    return None


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device, dims: ParallelDims):
    """AdamW: torch's (fused kernel on CUDA, foreach elsewhere), Transformer Engine's or apex's
    FusedAdam (optim.impl); on fp32 main shards — ZeRO-1 over dp × cp with optim.distributed, and always
    for bf16 weights (their fp32 master weights live in the optimizer)."""
    buckets = getattr(model, "grad_buckets", None)
    if buckets is not None and (buckets.shard or buckets.main_grads):

        if cfg.impl != "torch":
            raise ValueError(f"optim.impl = '{cfg.impl}' steps the parameters themselves; ZeRO-1 and bf16 weights "
                             "(fp32 master shards) run torch's fused AdamW: use optim.impl = 'torch'.")
        return DistributedOptimizer(model, buckets, cfg, dims.comm("dp_cp"), fused=device.type == "cuda")
    groups = param_groups(model, cfg.weight_decay)
    if cfg.impl == "te":
        from transformer_engine.pytorch.optimizers import FusedAdam

        return FusedAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adam_w_mode=True)
    if cfg.impl == "apex":
        from apex.optimizers import FusedAdam  # type: ignore[no-redef]

        return FusedAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adam_w_mode=True)
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=fused or None, foreach=None if fused else True,
    )
