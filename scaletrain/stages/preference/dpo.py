"""The DPO-family objective: DPO, IPO, hinge, SimPO (reference-free), with RPO's NLL term.

A microbatch of M pairs runs as one forward of 2M rows (chosen rows, then rejected rows); sequence
log-probs come from the vocab-parallel per-token loss over the response masks, so the vocabulary is
never gathered (under context parallelism each rank's partial sums are summed over cp first). The
loss (stages/preference/losses.py) is summed over pairs and normalised by the global pair count
like every objective. Only the last pipeline stage evaluates loss_fn, so only it
needs the reference values: the starting policy's (chosen, rejected) log-probs per pair, filled once
before the first step by the reference phase (stages/preference/reference.py) into the table both share.
"""

from __future__ import annotations

import torch

from scaletrain.data.packing import model_inputs
from scaletrain.distributed.comm import Comm
from scaletrain.generation.scoring import sequence_logprobs
from scaletrain.nn import cross_entropy_per_token
from scaletrain.stages.preference.losses import LENGTH_NORMALISED, preference_loss
from scaletrain.trainer.contracts import Batch, LossFn, Objective

METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")
ReferenceTable = dict[int, tuple[float, float]]  # pair index → the starting policy's (chosen, rejected) log-probs


def stack_pairs(batch: Batch) -> Batch:
    """M pairs → one model input of 2M rows: the chosen rows, then the rejected rows."""
    return {"tokens": torch.cat([batch["chosen_tokens"], batch["rejected_tokens"]]),
            "labels": torch.cat([batch["chosen_labels"], batch["rejected_labels"]]),
            "response_mask": torch.cat([batch["chosen_mask"], batch["rejected_mask"]]),
            "index": batch["index"]}


class DPOObjective(Objective):
    name = "dpo"
    metrics = METRICS  # logged per step (means over pairs) next to the loss

    def __init__(self, tp: Comm | None, loss_type: str, beta: float, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, fused_cross_entropy: bool = False, nll_weight: float = 0.0,
                 cp: Comm | None = None, reference: ReferenceTable | None = None) -> None:
        self.tp, self.loss_type, self.beta, self.nll_weight = tp, loss_type, beta, nll_weight
        self.cp = cp  # context parallelism: each rank holds part of every row's tokens
        self.label_smoothing, self.simpo_gamma, self.fused = label_smoothing, simpo_gamma, fused_cross_entropy
        self.reference: ReferenceTable = {} if reference is None else reference

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"

    def prepare(self, batch: Batch) -> Batch:
        return stack_pairs(batch)

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["index"].numel(), device=batch["index"].device)

    def sequence_logps(self, output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token loss [2M, s], sequence log-probs [2M]) of the stacked rows, as this loss type sums them."""
        per_token = cross_entropy_per_token(output, batch["labels"], self.tp, fused=self.fused)
        logps = sequence_logprobs(per_token, batch["response_mask"], self.loss_type in LENGTH_NORMALISED, cp=self.cp)
        return per_token, logps

    def forward_step(self, batch: Batch, model: torch.nn.Module) -> tuple[torch.Tensor, LossFn]:
        logits = model(batch["tokens"], **model_inputs(batch))
        mask, index = batch["response_mask"], batch["index"]

        def loss_fn(output: torch.Tensor):
            per_token, logps = self.sequence_logps(output, batch)
            n = index.numel()
            chosen, rejected = logps[:n], logps[n:]
            ref_c = ref_r = None
            if self.needs_reference:
                try:
                    ref = [self.reference[i] for i in index.tolist()]
                except KeyError as e:
                    raise RuntimeError(f"no reference log-prob for pair {e}; the reference pass did not cover it") from e
                ref_t = torch.tensor(ref, dtype=logps.dtype, device=logps.device)
                ref_c, ref_r = ref_t[:, 0], ref_t[:, 1]
            losses, metrics = preference_loss(self.loss_type, chosen, rejected, ref_c, ref_r, beta=self.beta,
                                              label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
            if self.nll_weight:  # RPO: the chosen response's mean token NLL keeps it likely
                losses = losses - self.nll_weight * sequence_logprobs(per_token[:n], mask[:n], True, cp=self.cp)
            return losses.sum(), {k: metrics[k].sum() for k in METRICS}

        return logits, loss_fn
