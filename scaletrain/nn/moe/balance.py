"""Load-balancing terms of the MoE layers: how they reach the gradient, and what each layer records.

The auxiliary and z losses are not returned through the model's output (every stage's objective would
have to know about them): each MoE layer attaches its weighted term to its output with `attach_loss`,
an identity whose backward also feeds gradient 1 into the term (Megatron's MoEAuxLossAutoScaler). The
weight — coefficient × this microbatch's routed tokens / the global batch's routed tokens — is set by
the train step (`MoELayer.loss_scale`), so the terms are token-weighted means over the global batch,
like the objective's loss, at every dp, cp, pp and microbatch count.
"""

from __future__ import annotations

import torch


class _AttachLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=g.device)


def attach_loss(out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """`out`, unchanged; backward through it also differentiates the scalar `loss` (added to the objective)."""
    return _AttachLoss.apply(out, loss)


def in_backward() -> bool:
    """Whether this forward is a recomputation inside backward (parallel.recompute): not recorded twice."""
    return torch._C._current_graph_task_id() != -1


class MoEStats:
    """What one MoE layer saw over the training forwards since the last `reset` (detached, float64):
    assignments per expert before dropping, dropped assignments, routed tokens, and the token-weighted
    sums of its aux and z terms (unweighted by their coefficients)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(self, counts: torch.Tensor, dropped: torch.Tensor, tokens: int, aux: torch.Tensor,
               z: torch.Tensor) -> None:
        """Kept on the device until `vector()` (no host sync per microbatch)."""
        n = torch.tensor(float(tokens), dtype=torch.float64, device=counts.device)
        self.pending.append((counts.detach(), dropped.detach().to(torch.float64).reshape(1),
                             n.reshape(1), torch.stack([aux.detach().to(torch.float64) * n,
                                                        z.detach().to(torch.float64) * n])))

    def vector(self, device: torch.device) -> torch.Tensor:
        """[E + 4]: counts per expert, dropped, tokens, Σ aux·tokens, Σ z·tokens (this rank's forwards)."""
        out = torch.zeros(self.num_experts + 4, dtype=torch.float64, device=device)
        for counts, dropped, n, terms in self.pending:
            out += torch.cat([counts.to(device), dropped.to(device), n.to(device), terms.to(device)])
        return out
