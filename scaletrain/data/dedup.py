"""Deduplication: exact (normalised text hash) and near-duplicate (MinHash LSH over word shingles).

Both keep the first occurrence in input order and drop later ones, so a re-run over the same
inputs keeps the same documents.

- Exact: SHA-1 of the text after Unicode NFKC, lower-casing and whitespace collapsing — copies that
  differ only in case or spacing count as one.
- Near (data/near_dedup.py): MinHash signatures of the set of word 5-gram shingles in an LSH index
  banded so that pairs at Jaccard `threshold` (default 0.8) are candidates with probability ≥ 0.99; a
  candidate counts as a duplicate when the signatures' estimate of its Jaccard similarity to an indexed
  document reaches the threshold. The approach of Lee et al. 2022 and The Pile / RefinedWeb pipelines,
  at CPU scale: the index lives in memory, ~2 KB per kept document.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

__all__ = ["ExactDedup", "jaccard", "normalise", "shingles"]

_SPACE = re.compile(r"\s+")
_TOKEN = re.compile(r"\w+")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


class ExactDedup:
    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        """True when an earlier document had the same normalised text; records this one otherwise."""
        key = hashlib.sha1(normalise(text).encode()).digest()
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Word n-grams of the normalised text (the whole text when it has fewer than n words)."""
    words = _TOKEN.findall(normalise(text))
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for tests and reports)."""
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / max(len(sa | sb), 1)
