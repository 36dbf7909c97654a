"""The mixture-of-experts part of the one train step: balancing-term weights, routing metrics, and the
aux-loss-free bias updates.

Normalisation: each MoE layer attaches coef·term·(tokens it routed) / (tokens routed by the whole global
batch: every microbatch on every dp × cp rank) to the gradient, so its aux and z terms enter the loss as
token-weighted means over the global batch — the same convention as the objective's loss (a sum over
items divided by their global count), independent of dp, cp, pp and the microbatch count.

Metrics (per step; over the global batch, summed over the MoE layers where they are losses):
moe_aux_loss, moe_z_loss (the coefficient-weighted terms added to the loss), moe_expert_tokens_min /
_max (fewest / most assignments any expert of any MoE layer received, before dropping), moe_expert_tokens_cv
(coefficient of variation of the assignments per expert, std/mean, averaged over the MoE layers; 0 is
perfect balance), moe_dropped_fraction (assignments dropped by the capacity factor / all).
"""

from __future__ import annotations

import re

import torch

from scaletrain.config.moe import MoEConfig, is_moe_layer
from scaletrain.distributed.dims import ParallelDims
from scaletrain.nn.moe import MoE

MOE_CONSOLE_KEYS = ("moe_aux_loss", "moe_expert_tokens_cv", "moe_dropped_fraction")  # also on the console line
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class MoEStep:
    """The MoE layers of one rank's model (possibly none: a pipeline stage of dense layers still joins the
    step's collectives), and what the step does with them."""

    def __init__(self, model: torch.nn.Module, dims: ParallelDims | None, moe: MoEConfig, num_layers: int) -> None:
        self.dims, self.moe = dims, moe
        moe_ids = [i for i in range(num_layers) if is_moe_layer(moe, i)]
        self.layers: list[tuple[int, MoE]] = []
        for position, (name, module) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, MoE)):
            match = _LAYER.search(name)
            row = moe_ids.index(int(match.group(1))) if match and int(match.group(1)) in moe_ids else position
            self.layers.append((row, module))
        self.rows = max([len(moe_ids)] + [r + 1 for r, _ in self.layers])
        self.device = next(model.parameters()).device
        self.counts: dict[int, torch.Tensor] = {}

    @classmethod
    def of(cls, model: torch.nn.Module, dims: ParallelDims | None) -> MoEStep | None:
        """None for a model without MoE layers on any stage (nothing to do, no collective). Decided by the
        model's config, the same on every rank, not by the layers this rank holds."""
        cfg = getattr(model, "cfg", None)
        if cfg is None or not any(is_moe_layer(cfg.moe, i) for i in range(cfg.num_layers)):
            return None
        return cls(model, dims, cfg.moe, cfg.num_layers)

    def _over_dp_cp(self, t: torch.Tensor) -> torch.Tensor:
        if self.dims is not None and self.dims.dp * self.dims.cp > 1:
            return self.dims.comm("dp_cp").all_reduce(t)
        return t

    def begin(self, microbatches: list[dict]) -> None:
        """Weight the balancing terms by 1 / the global batch's routed tokens (collective over dp × cp)."""
        local = sum(int(b["tokens"].numel()) for b in microbatches)
        total = self._over_dp_cp(torch.tensor([float(local)], dtype=torch.float64, device=self.device))
        scale = 1.0 / max(float(total.item()), 1.0)  # host sync, once per step
        for _, layer in self.layers:
            layer.loss_scale = scale
            layer.stats.reset()

    def end(self) -> dict[str, float]:
        """The step's routing metrics over the global batch (collective over dp × cp and pp); keeps each
        local layer's global assignment counts for `update_bias`."""
        num_experts = self.moe.num_experts
        table = torch.zeros(self.rows, num_experts + 4, dtype=torch.float64, device=self.device)
        for row, layer in self.layers:
            table[row] = layer.stats.vector(self.device)
            layer.stats.reset()
        table = self._over_dp_cp(table)
        self.counts = {row: table[row, :num_experts].clone() for row, _ in self.layers}
        if self.dims is not None and self.dims.pp > 1:  # each stage holds its own layers' rows
            table = self.dims.comm("pp").all_reduce(table)
        table = table.cpu()  # host sync, once per step
        present = table[:, num_experts + 1] > 0  # layers that routed tokens (all of them in training)
        if not bool(present.any()):
            return {}
        counts, tokens = table[present, :num_experts], table[present, num_experts + 1]
        cv = counts.std(dim=1, unbiased=False) / counts.mean(dim=1).clamp_min(1e-12)
        return {
            "moe_aux_loss": self.moe.aux_loss_coef * float((table[present, num_experts + 2] / tokens).sum()),
            "moe_z_loss": self.moe.z_loss_coef * float((table[present, num_experts + 3] / tokens).sum()),
            "moe_expert_tokens_min": float(counts.min()),
            "moe_expert_tokens_max": float(counts.max()),
            "moe_expert_tokens_cv": float(cv.mean()),
            "moe_dropped_fraction": float(table[present, num_experts].sum() / counts.sum().clamp_min(1)),
        }

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): bias_e += rate·sign(mean load − load_e), from the step's
        global counts; the same on every rank that holds the layer."""
        for row, layer in self.layers:
            bias = layer.router.expert_bias
            if bias is None or not layer.bias_update_rate or row not in self.counts:
                continue
            load = self.counts[row].to(bias.device)
            bias += layer.bias_update_rate * torch.sign(load.mean() - load).to(bias.dtype)
