"""AI feedback against written principles (RLAIF, Constitutional AI's preference stage): preference
pairs labelled by a judge model instead of people, for `scaletrain dpo` or `scaletrain reward`.

For every prompt the policy samples two responses (its own distribution: the pairs are on-policy).
The judge reads the conversation, one principle (drawn per prompt from the principles file, as
Constitutional AI samples one per comparison) and both responses as options (A) and (B), and its
preference is the probability it gives the option letters after "The answer is: (" — normalised
over the two letters. Language models favour a position, so each pair is judged in both orders and
the two probabilities averaged (Lee et al. 2023): p(first better) = ½·[p_AB(A) + p_BA(B)]. The
likelier response becomes `chosen`; pairs the judge cannot separate (|p − ½| < min_confidence) and
identical responses are dropped and counted.

Both models run frozen in the same parallel layout (tp, pp; dp splits the prompts): sampling through
the rollout sampler, judging through the forward-only log-likelihood pass (generation/likelihood.py).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

JUDGE_TEMPLATE = ("Consider the following conversation between a human and an assistant:\n\n{conversation}\n\n"
                  "{principle}\n\nOptions:\n(A) {first}\n(B) {second}\n\nThe answer is: (")
OPTIONS = ("A", "B")


@dataclass
class FeedbackReport:
    prompts: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)
    position_bias: float = 0.0  # mean p(A) over all judgements: 0.5 is unbiased

    def line(self) -> str:
        dropped = ", ".join(f"{n} {r}" for r, n in self.dropped.most_common()) or "none"
        return (f"rlaif: {self.prompts} prompts → {self.pairs} preference pairs; dropped: {dropped}; "
                f"judge's mean p(A) {self.position_bias:.3f} (0.5 = no position bias)")


def read_principles(path: str) -> list[str]:
    """One principle per non-empty line (lines starting with # are comments)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    principles = [line for line in lines if line and not line.startswith("#")]
    if not principles:
        raise ValueError(f"{path} holds no principle (one per line)")
    return principles


def conversation_text(messages: list[dict]) -> str:
    return "\n\n".join(f"{'Human' if m['role'] == 'user' else m['role'].capitalize()}: {m.get('content') or ''}"
                       for m in messages if m["role"] != "system")


def judge_rows(tokenizer, conversation: str, principle: str, first: str, second: str,
               template: str = JUDGE_TEMPLATE) -> list[tuple[list[int], int]]:
    """The four scored rows of one pair: (order AB, letter A), (AB, B), (BA, A), (BA, B)."""
    rows = []
    for a, b in ((first, second), (second, first)):
        text = template.format(conversation=conversation, principle=principle, first=a.strip(), second=b.strip())
        context = tokenizer.encode(text)
        for letter in OPTIONS:
            whole = tokenizer.encode(text + letter)
            rows.append((whole if len(whole) > len(context) else context + tokenizer.encode(letter), len(context)))
    return rows


def preferences(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[pairs·4] option log-likelihoods (judge_rows order) → (p(first response better) [pairs],
    p(option A) over both orders [pairs·2]), each order's two letters normalised against each other."""
    lp = logps.double().view(-1, 2, 2)  # pair, order, letter
    p_letter = torch.softmax(lp, dim=-1)
    p_first = 0.5 * (p_letter[:, 0, 0] + p_letter[:, 1, 1])  # A in order AB, B in order BA
    return p_first, p_letter[..., 0].reshape(-1)


def pick_principles(principles: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(principles) for _ in range(n)]
