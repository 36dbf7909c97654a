"""The DPO family of preference losses, on sequence log-probabilities of chosen and rejected responses.

Inputs per pair (all [n] tensors): policy log-probs πc, πr and, except for SimPO, reference log-probs
rc, rr. With the implicit reward margin h = (πc − rc) − (πr − rr):

- sigmoid (DPO, Rafailov et al. 2023): −(1−ε)·log σ(β·h) − ε·log σ(−β·h)   (ε: label smoothing, cDPO)
- ipo (Azar et al. 2023):              (h − 1/(2β))²     — on length-normalised (mean per token) log-probs
- hinge (SLiC, Zhao et al. 2023):      max(0, 1 − β·h)
- simpo (Meng et al. 2024), reference-free: −log σ(β·(π̄c − π̄r) − γ) on length-normalised log-probs

`preference_loss` returns per-pair losses and the metrics trainers report: the implicit rewards
β·(π − r) of chosen and rejected, their margin, and accuracy (chosen reward > rejected reward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
LENGTH_NORMALISED = ("ipo", "simpo")  # these take mean per-token log-probs


def preference_loss(loss_type: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None, *,
                    beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss [n] and metrics ([n] tensors) for `loss_type`; see the module docstring."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss {loss_type!r}; one of {', '.join(LOSS_TYPES)}")
    if loss_type == "simpo":
        logits = policy_chosen - policy_rejected
        losses = -F.logsigmoid(beta * logits - simpo_gamma)
        chosen_reward, rejected_reward = beta * policy_chosen.detach(), beta * policy_rejected.detach()
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"preference loss {loss_type!r} needs reference log-probs (ref_chosen, ref_rejected)")
        h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        if loss_type == "sigmoid":
            losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        elif loss_type == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        else:  # hinge
            losses = torch.relu(1 - beta * h)
        chosen_reward = beta * (policy_chosen - ref_chosen).detach()
        rejected_reward = beta * (policy_rejected - ref_rejected).detach()
    metrics = {"rewards_chosen": chosen_reward, "rewards_rejected": rejected_reward,
               "rewards_margin": chosen_reward - rejected_reward,
               "rewards_accuracy": (chosen_reward > rejected_reward).to(chosen_reward.dtype)}
    return losses, metrics
