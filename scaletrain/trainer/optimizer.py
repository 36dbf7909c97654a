"""AdamW with decoupled weight decay on matrices only (never on norms and biases)."""

from __future__ import annotations

import torch

from scaletrain.config.schema import OptimConfig


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


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device, dims=None):
    """torch AdamW (fused kernel on CUDA, foreach elsewhere), or ZeRO-1 with optim.distributed over dp > 1."""
    buckets = getattr(model, "grad_buckets", None)
    if cfg.distributed and buckets is not None and buckets.shard:
        from scaletrain.parallel.distributed_optimizer import DistributedOptimizer

        return DistributedOptimizer(model, buckets, cfg, dims.comm("dp"))
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=fused or None, foreach=None if fused else True,
    )
