"""A trained reward model as an RL reward (RLHF): completions scored by a frozen score-head model.

`posttrain.rewards.functions = ["reward_model"]` with `posttrain.rewards.model = <HF directory or checkpoint>`
builds the reward model in the policy's own layout (tp, pp, SP; the same role layers, frozen, no
gradients) and scores each prompt + completion by one forward through the forward-only schedule.
The score is read where the reward objective trained it (stages/preference/reward_model.py): at the
conversation's last rendered token, so a completion's trailing eos is dropped first (its
end-of-turn marker is kept). Rows are left-padded as rollouts are (padding is its own document),
so a row scores what it would alone.

Collective over the replica's tp, cp and pp ranks (every rank calls it with the same rows); the scores
come out on every rank of the replica (read on the last stage, broadcast over pp; identical over tp;
under context parallelism each cp rank scores a share of the rows on whole sequences, then they
gather over cp).
The reward model must share the policy's tokenizer and chat template — train it from the same run
family; the vocabulary size is checked up front.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scaletrain.data.packing import block_causal_mask
from scaletrain.distributed.dims import ParallelDims
from scaletrain.generation.batching import left_padded, pass_unit, row_microbatches, split_over_cp
from scaletrain.parallel.context_parallel import cp_unbound
from scaletrain.parallel.parallelize import eager
from scaletrain.trainer.step import forward_pass


class RewardModelScorer:
    """Callable (prompts, completions) → scores [n] float64, on every rank of the replica (a
    collective: scored by the replica's ranks together, not by its lead rank alone)."""

    def __init__(self, model: torch.nn.Module, dims: ParallelDims, *, pad_id: int, eos_id: int | None, micro_batch: int,
                 precision, device: torch.device, width_multiple: int = 1) -> None:
        self.model, self.dims, self.pad_id, self.eos_id = model, dims, pad_id, eos_id
        self.micro_batch, self.precision, self.device, self.width_multiple = micro_batch, precision, device, width_multiple

    @torch.no_grad()
    def __call__(self, prompts: Sequence[list[int]], completions: Sequence[list[int]]) -> torch.Tensor:
        rows = []
        for p, c in zip(prompts, completions):
            if c and c[-1] == self.eos_id:
                c = c[:-1]
            rows.append(list(p) + list(c))
        with cp_unbound(self.model):
            scores = split_over_cp(rows, self.dims, self._score)
        return torch.tensor(scores, dtype=torch.float64)

    def _score(self, rows: list[list[int]]) -> list[float]:
        d = self.dims
        # Interleaved pipelines need whole groups of pp microbatches: pad with repeats, not read.
        unit = pass_unit(d, self.micro_batch)
        padded = rows + [rows[-1]] * (-len(rows) % unit)
        scores = torch.zeros(len(padded), dtype=torch.float64)

        def forward_step(batch: dict[str, torch.Tensor], module: torch.nn.Module):
            out = module(batch["tokens"], position_ids=batch["position_ids"],
                         attention_mask=block_causal_mask(batch["document_ids"]))

            def record(output: torch.Tensor):  # last stage: [b, s, 1] scores, the row's last token at the end
                scores[batch["row"].cpu()] = output[:, -1, 0].double().cpu()
                return output.new_zeros(()), {}

            return out, record

        batch = left_padded(padded, self.pad_id, self.width_multiple)
        with eager(), self.precision.autocast():  # rows of any width: compiled blocks would recompile
            forward_pass(forward_step, row_microbatches(batch, self.micro_batch, self.device), self.model, d)
        if d.pp > 1:
            scores = d.comm("pp").broadcast(scores.to(self.device), src_group_rank=d.pp - 1).cpu()
        return scores[:len(rows)].tolist()
