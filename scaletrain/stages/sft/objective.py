"""The SFT objective: token cross-entropy on target (assistant) tokens of packed conversations.

Same contract as pretraining (`count`, `forward_step`); the batch also carries position ids that
restart per document and the document ids that make the attention block-diagonal, so packed
conversations never see each other. Normalised by the global number of target tokens.
"""

from __future__ import annotations

import torch

from scaletrain.distributed.comm import Comm
from scaletrain.nn import cross_entropy_per_token
from scaletrain.nn.blockwise_attention import document_mask
from scaletrain.trainer.contracts import Objective


class SFTObjective(Objective):
    name = "sft"

    def __init__(self, tp: Comm | None = None, fused_cross_entropy: bool = False) -> None:
        self.tp, self.fused_cross_entropy = tp, fused_cross_entropy

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["loss_mask"].sum()

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        # Under context parallelism the batch brings the mask to the gathered keys (built before the split).
        mask = batch["attention_mask"] if "attention_mask" in batch else document_mask(batch["document_ids"])
        logits = model(batch["tokens"], position_ids=batch["position_ids"], attention_mask=mask)
        labels, loss_mask = batch["labels"], batch["loss_mask"]

        def loss_fn(output: torch.Tensor):
            per_token = cross_entropy_per_token(output, labels, self.tp, fused=self.fused_cross_entropy)
            return (per_token * loss_mask.to(per_token.dtype)).sum(), {"tokens": loss_mask.sum()}

        return logits, loss_fn
