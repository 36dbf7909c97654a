"""Deduplication: exact (normalised text hash) and near-duplicate (MinHash LSH over word shingles).

Both keep the first occurrence in input order and drop later ones, so a re-run over the same
inputs keeps the same documents.

- Exact: SHA-1 of the text after Unicode NFKC, lower-casing and whitespace collapsing — copies that
  differ only in case or spacing count as one.
- Near: MinHash signatures (`datasketch`, 128 permutations) of the set of word 5-gram shingles, banded
  into an LSH index tuned for Jaccard `threshold` (default 0.8); a candidate counts as a duplicate when
  its estimated Jaccard similarity to an indexed document reaches the threshold. This is the
  approach of Lee et al. 2022 and The Pile / RefinedWeb pipelines, at CPU scale: the index lives in
  memory, a few hundred bytes per document.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

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


class NearDedup:
    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 1) -> None:
        from datasketch import MinHash, MinHashLSH

        if not 0 < threshold < 1:
            raise ValueError(f"near-duplicate threshold {threshold} must be in (0, 1)")
        self._minhash, self.num_perm, self.seed, self.shingle, self.threshold = MinHash, num_perm, seed, shingle, threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.signatures: dict[str, object] = {}

    def signature(self, text: str):
        m = self._minhash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(list(shingles(text, self.shingle)))
        return m

    def is_duplicate(self, text: str, key: str) -> str | None:
        """The key of an earlier near-duplicate of `text`, or None (then `text` is indexed under `key`)."""
        m = self.signature(text)
        for other in self.lsh.query(m):
            if m.jaccard(self.signatures[other]) >= self.threshold:  # LSH candidates are only likely matches
                return other
        self.lsh.insert(key, m)
        self.signatures[key] = m
        return None


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for tests and reports)."""
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / max(len(sa | sb), 1)
