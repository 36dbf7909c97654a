"""DAPO's dynamic sampling: a group whose completions all earn the same reward has zero advantage
everywhere and teaches nothing, so such groups are dropped and more prompts are sampled until the
rollout batch is full of informative groups (Yu et al. 2025, "DAPO", §3.2).

The choice is global, so a run picks the same groups at any dp size (and equals the single process):
after each sampling round the replicas' new groups are all-gathered over dp (token ids, a few
thousand integers), every rank holds the same pool in global order (round, then prompt position),
keeps its first `needed` informative groups — filling up with uninformative ones, in order, when
posttrain.grpo.max_sampling_rounds runs out — and dp rank r takes the r-th contiguous share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Groups:
    """Rollouts of whole groups, in group order (CPU). Group i is prompt `index[i]`; its completions
    are rows i·G … i·G+G−1 of the per-completion fields."""

    index: list[int]  # [groups] prompt indices
    completions: list[list[int]]  # [groups·G] token ids
    stopped: list[bool]  # [groups·G] False where max_new_tokens ran out
    scores: torch.Tensor  # [groups·G, rewards] float64, one column per reward function
    missing: torch.Tensor  # [groups·G] float64, 1.0 without the end-of-turn marker

    def cat(self, other: Groups) -> Groups:
        return Groups(self.index + other.index, self.completions + other.completions, self.stopped + other.stopped,
                      torch.cat([self.scores, other.scores]), torch.cat([self.missing, other.missing]))

    def take(self, groups: list[int], group_size: int) -> Groups:
        rows = [i * group_size + j for i in groups for j in range(group_size)]
        return Groups([self.index[i] for i in groups], [self.completions[r] for r in rows],
                      [self.stopped[r] for r in rows], self.scores[rows], self.missing[rows])


def gather_groups(mine: Groups, dp, max_new_tokens: int, device: torch.device) -> Groups:
    """Every dp rank's `mine`, concatenated in dp rank order (the global prompt order). Collective over
    `dp` (a Comm, or None: returned as is); the same result on every rank."""
    if dp is None or dp.size == 1:
        return mine
    n = len(mine.completions)
    tokens = torch.full((n, max_new_tokens), -1, dtype=torch.long)
    for i, c in enumerate(mine.completions):
        tokens[i, :len(c)] = torch.tensor(c, dtype=torch.long)
    lengths = torch.tensor([len(c) for c in mine.completions], dtype=torch.long)
    per_row = torch.cat([tokens, lengths[:, None], torch.tensor(mine.stopped, dtype=torch.long)[:, None]], dim=1)
    values = torch.cat([mine.scores, mine.missing[:, None]], dim=1)
    index = dp.all_gather(torch.tensor(mine.index, dtype=torch.long).to(device)).cpu()
    per_row = dp.all_gather(per_row.to(device)).cpu()
    values = dp.all_gather(values.to(device)).cpu()
    completions = [row[:int(row[-2])].tolist() for row in per_row]
    return Groups(index.tolist(), completions, [bool(s) for s in per_row[:, -1]], values[:, :-1], values[:, -1])


def informative_groups(total: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups] bool: True where a group's total rewards are not all equal (a non-zero advantage)."""
    r = total.reshape(-1, group_size)
    return r.max(dim=1).values != r.min(dim=1).values


def choose_groups(informative: torch.Tensor, needed: int) -> tuple[list[int], int]:
    """The first `needed` informative groups in pool order, then uninformative ones, in order, if too few
    were found. Returns (group positions in the pool, how many of them are such fillers)."""
    good = informative.nonzero().flatten().tolist()
    rest = (~informative).nonzero().flatten().tolist()
    chosen = good[:needed]
    filled = needed - len(chosen)
    return chosen + rest[:filled], filled
