"""Mixture of experts in the role vocabulary: `MoE` (router, routed experts, optional shared expert) is
the feed-forward block of a MoE layer; a model family builds it where `is_moe_layer(cfg.moe, i)` holds.

    from scaletrain.nn.moe import MoE, is_moe_layer
    self.mlp = MoE(cfg, tp_size, dtype, r) if is_moe_layer(cfg.moe, index) else SwiGLU(cfg, tp_size, dtype, r)

Interface: MOE docs (docs/moe.md). Expert parallelism, the balancing terms' normalisation and the
aux-loss-free bias updates are bound and driven from outside (parallelize, trainer/step.py).
"""

from scaletrain.config.moe import MoEConfig, is_moe_layer
from scaletrain.nn.moe.balance import MoEStats, attach_loss
from scaletrain.nn.moe.experts import GroupedExperts, bind_grouped_gemm, select_grouped_gemm
from scaletrain.nn.moe.layer import MoE, SharedExpert
from scaletrain.nn.moe.router import Routing, TopKRouter, capacity_keep

__all__ = ["GroupedExperts", "MoE", "MoEConfig", "MoEStats", "Routing", "SharedExpert", "TopKRouter",
           "attach_loss", "bind_grouped_gemm", "capacity_keep", "is_moe_layer", "select_grouped_gemm"]
