"""Decontamination: drop training documents that share a long word n-gram with an evaluation set.

As GPT-3 (Brown et al. 2020, appendix C) and Llama 2 did, overlap is measured in word n-grams
(default 13) of normalised text (lower case, punctuation dropped). An evaluation text shorter than
n words but of at least `min_short` words (default 8) contributes itself as one gram, so short
questions are still caught when they appear verbatim; shorter strings ("The answer is 14.") are too
generic to mean a leak.
Every string field of an evaluation row counts (a prompt, its messages' contents, the answer text),
since a leaked test item can come from any of them. A training document is removed whole when any
of its n-grams is in the evaluation set; the report names the evaluation file it collided with.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


class Decontaminator:
    def __init__(self, n: int = 13, min_short: int = 8) -> None:
        if n < 1:
            raise ValueError(f"n-gram size {n} must be at least 1")
        self.n, self.min_short = n, min_short
        self.grams: dict[tuple[str, ...], str] = {}  # gram → the evaluation source it came from
        self.short: dict[tuple[str, ...], str] = {}  # whole evaluation texts shorter than n words

    def add_eval_rows(self, rows: Iterable[dict], source: str) -> None:
        for row in rows:
            for text in _strings(row):
                w = words(text)
                if not w:
                    continue
                if self.min_short <= len(w) < self.n:
                    self.short.setdefault(tuple(w), source)
                for i in range(len(w) - self.n + 1):
                    self.grams.setdefault(tuple(w[i:i + self.n]), source)

    def contaminated_by(self, text: str) -> str | None:
        """The evaluation source `text` overlaps, or None."""
        w = words(text)
        for i in range(len(w) - self.n + 1):
            hit = self.grams.get(tuple(w[i:i + self.n]))
            if hit is not None:
                return hit
        if self.short:
            lengths = {len(k) for k in self.short}
            for k in lengths:
                for i in range(len(w) - k + 1):
                    hit = self.short.get(tuple(w[i:i + k]))
                    if hit is not None:
                        return hit
        return None
