"""The reward-model objective: a Bradley–Terry loss on preference pairs, scored by a score head.

The model is the same parallel Llama with `model.num_labels = 1`: a [1, hidden] `score` head in
place of the language-model head (HF's *ForSequenceClassification). A conversation's reward is
the score at its last rendered token (the template's end-of-turn marker — HF pools at the last
non-padding token, so an exported model scores a conversation the same way). Per pair

    loss = −log σ(r_chosen − r_rejected − margin)  (+ c·(r_chosen + r_rejected)²)

— InstructGPT's pairwise loss; `reward_margin` as in Llama 2's margin term (a constant here);
`reward_center` as TRL's center_rewards_coefficient keeps rewards near 0, which GRPO/PPO
advantages like. Summed over pairs and normalised by the global pair count like every objective.
Metrics: mean chosen / rejected rewards, their margin and accuracy (chosen scored higher).

A microbatch of M pairs runs as one forward of 2M rows (chosen, then rejected), as in DPO; only
the last pipeline stage evaluates loss_fn. Scores arrive replicated over tp (nn/score.py); under context
parallelism the read-out token sits on one cp rank, whose score is summed over cp to every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaletrain.data.packing import model_inputs
from scaletrain.distributed.comm import Comm
from scaletrain.parallel.context_parallel import sum_over_cp
from scaletrain.trainer.contracts import Objective

METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """[b] input position of each row's last rendered token: the last label position of the response.

    PreferenceDataset masks the response's labels through the appended eos; label position j holds
    token j+1, so the last masked label position j is where token j — the conversation's last
    token before eos — is an input."""
    positions = torch.arange(response_mask.shape[-1], device=response_mask.device)
    return torch.where(response_mask.bool(), positions, -1).amax(-1)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0, center: float = 0.0
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss [n] and metrics ([n] tensors) from chosen / rejected rewards [n]."""
    losses = -F.logsigmoid(chosen - rejected - margin)
    if center:
        losses = losses + center * (chosen + rejected) ** 2
    c, r = chosen.detach(), rejected.detach()
    return losses, {"rewards_chosen": c, "rewards_rejected": r, "rewards_margin": c - r,
                    "rewards_accuracy": (c > r).to(c.dtype)}


class RewardObjective(Objective):
    name = "reward"
    metrics = METRICS

    def __init__(self, margin: float = 0.0, center: float = 0.0, cp: Comm | None = None) -> None:
        self.margin, self.center = margin, center
        self.cp = cp  # context parallelism: the read-out token is on one cp rank of each row

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """M pairs → one model input of 2M rows (chosen, then rejected) and where each is scored."""
        return {"tokens": torch.cat([batch["chosen_tokens"], batch["rejected_tokens"]]),
                "score_index": torch.cat([last_token_index(batch["chosen_mask"]),
                                          last_token_index(batch["rejected_mask"])]),
                "index": batch["index"]}

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["index"].numel(), device=batch["index"].device)

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        scores = model(batch["tokens"], **model_inputs(batch))
        where, n = batch["score_index"], batch["index"].numel()

        def loss_fn(output: torch.Tensor):
            here = where >= 0  # under cp: the rows whose read-out token this rank holds (−1 elsewhere)
            picked = output[torch.arange(output.shape[0], device=output.device), where.clamp(min=0), 0]
            rewards = sum_over_cp(torch.where(here, picked, torch.zeros_like(picked)), self.cp)
            losses, metrics = bradley_terry(rewards[:n], rewards[n:], self.margin, self.center)
            return losses.sum(), {k: metrics[k].sum() for k in METRICS}

        return scores, loss_fn
