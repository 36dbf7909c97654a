"""The pretraining objective: next-token cross-entropy over tokens with loss_mask = 1.

Every objective (SFT, DPO, … later) provides the same two things: `count(batch)`, its number of
loss items (the normaliser's share of that microbatch), and `forward_step` for the schedule.
"""

from __future__ import annotations

import torch

from scaletrain.distributed.comm import Comm
from scaletrain.nn import cross_entropy_per_token
from scaletrain.trainer.contracts import Objective


class LanguageModelingObjective(Objective):
    """Sum of per-token cross-entropy over loss-masked tokens; normalised by the global token count."""

    name = "pretrain"

    def __init__(self, tp: Comm | None = None, fused_cross_entropy: bool = False) -> None:
        self.tp = tp  # logits arrive vocabulary-sharded over this communicator
        self.fused_cross_entropy = fused_cross_entropy

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["loss_mask"].sum()

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        if "attention_mask" in batch:  # context parallelism: this rank's tokens, at their global positions
            logits = model(batch["tokens"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
        else:
            logits = model(batch["tokens"])
        labels, mask = batch["labels"], batch["loss_mask"]

        def loss_fn(output: torch.Tensor):
            per_token = cross_entropy_per_token(output, labels, self.tp, fused=self.fused_cross_entropy)
            loss_sum = (per_token * mask.to(per_token.dtype)).sum()
            return loss_sum, {"tokens": mask.sum()}

        return logits, loss_fn
