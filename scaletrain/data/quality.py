"""Heuristic document-quality filters (Gopher's rules, Rae et al. 2021, appendix A), per document.

Each rule returns why a document fails, or None. Thresholds are Gopher's published ones, and are
fields of `QualityConfig` so a corpus that is not English web text can move them:

- length: 50 ≤ words ≤ 100,000; mean word length in [3, 10] characters;
- symbols: '#' and '...'/'…' per word ≤ 0.1; lines starting with a bullet ≤ 90%; lines ending in an
  ellipsis ≤ 30%; words with an alphabetic character ≥ 80%;
- English stop words: at least 2 of the, be, to, of, and, that, have, with;
- repetition: duplicate lines ≤ 30% of lines and ≤ 20% of characters; the most frequent 2/3/4-gram
  covers ≤ 20/18/16% of the characters; characters inside duplicated 5…10-grams ≤ 15…10%.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\S+")
_BULLETS = ("•", "●", "○", "▪", "◦", "*", "-", "–", "—")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})


@dataclass(frozen=True)
class QualityConfig:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2  # 0 turns the English-only rule off
    max_duplicate_lines: float = 0.3
    max_duplicate_line_chars: float = 0.2
    max_top_ngram_chars: tuple[float, float, float] = (0.20, 0.18, 0.16)  # n = 2, 3, 4
    max_duplicate_ngram_chars: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # n = 5 … 10


def _windows(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each n-gram start: the index of its distinct n-gram and how often that n-gram occurs.

    N-grams are compared by a 64-bit polynomial hash of their word ids (wrapping arithmetic): two
    different n-grams of one document collide with probability ~m²/2⁶⁴, far below any threshold's
    resolution, and one sort of integers replaces a sort of tuples."""
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(0x9E3779B97F4A7C15) + ids[j:j + m].astype(np.uint64) + np.uint64(1)
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def _top_ngram_share(ids: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Characters of the most frequent n-gram (times its count) over all word characters; ties take
    the longest such n-gram."""
    if len(ids) < n:
        return 0.0
    inverse, counts = _windows(ids, n)
    best = counts.max()
    if best < 2:
        return 0.0
    gram_chars = np.convolve(lengths, np.ones(n, dtype=np.int64), mode="valid")  # chars of the n-gram at each start
    return float(gram_chars[counts[inverse] == best].max() * best / max(lengths.sum(), 1))


def _duplicate_ngram_share(ids: np.ndarray, lengths: np.ndarray, n: int) -> float:
    """Characters of words covered by any n-gram that occurs more than once, over all word characters."""
    if len(ids) < n:
        return 0.0
    inverse, counts = _windows(ids, n)
    repeated = (counts[inverse] > 1).astype(np.int64)  # per n-gram start
    covered = np.convolve(repeated, np.ones(n, dtype=np.int64)) > 0  # per word: inside a repeated n-gram
    return float(lengths[covered].sum() / max(lengths.sum(), 1))


def quality_problem(text: str, cfg: QualityConfig = QualityConfig()) -> str | None:
    """The first rule `text` breaks, as a short reason ('too few words', …), or None."""
    words = _WORD.findall(text)
    n = len(words)
    if n < cfg.min_words:
        return "too few words"
    if n > cfg.max_words:
        return "too many words"
    mean = sum(len(w) for w in words) / n
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        return "mean word length out of range"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_ratio:
        return "too many symbols"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
        if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines:
            return "mostly bullet lines"
        if sum(line.endswith(("...", "…")) for line in lines) / len(lines) > cfg.max_ellipsis_lines:
            return "too many lines end in an ellipsis"
    if sum(any(c.isalpha() for c in w) for w in words) / n < cfg.min_alpha_words:
        return "too few alphabetic words"
    if cfg.min_stop_words and len(STOP_WORDS & {w.lower().strip(".,;:!?\"'()") for w in words}) < cfg.min_stop_words:
        return "too few English stop words"
    if lines:
        counts = Counter(lines)
        dup_lines = sum(c for c in counts.values() if c > 1) - sum(1 for c in counts.values() if c > 1)
        if dup_lines / len(lines) > cfg.max_duplicate_lines:
            return "repeated lines"
        dup_chars = sum(len(line) * (c - 1) for line, c in counts.items() if c > 1)
        if dup_chars / max(sum(len(line) for line in lines), 1) > cfg.max_duplicate_line_chars:
            return "repeated line characters"
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(w.lower(), len(vocab)) for w in words], dtype=np.int64)
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    for k, limit in zip((2, 3, 4), cfg.max_top_ngram_chars):
        if _top_ngram_share(ids, lengths, k) > limit:
            return f"a repeated {k}-gram dominates"
    for k, limit in zip(range(5, 11), cfg.max_duplicate_ngram_chars):
        if _duplicate_ngram_share(ids, lengths, k) > limit:
            return f"duplicated {k}-grams"
    return None
