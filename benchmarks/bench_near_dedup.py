"""Near-duplicate detection before and after the banding fix: recall and false removals on planted pairs,
and documents/s on a real corpus.

    python benchmarks/bench_near_dedup.py [--threshold 0.8] [--copies 8] [--pairs 2000] [--rounds 3]

Before: datasketch's MinHashLSH at the threshold with 128 values (its own banding, 9 × 13 at 0.8) and
the estimate checked against the threshold, as data/dedup.py had it. After: data/near_dedup.NearDedup.
Planted pairs: random-word documents of 400 words and copies with 0–24 words replaced (tests/test_curate.py's
generator), so exact shingle Jaccard spans ~0.5–1; recall counts pairs at ≥ threshold + 0.05, false
removals pairs at ≤ threshold − 0.1. Speed: every chapter of the bundled KJV written `copies` times with
a third of the longer words respelled per copy (benchmarks/bench_data_tools.py's corpus), all through
`is_duplicate`, timed alone, interleaved over rounds; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from scaletrain.data.dedup import shingles  # noqa: E402
from scaletrain.data.near_dedup import NearDedup, candidate_probability  # noqa: E402


class Before:
    """data/dedup.py's NearDedup before: datasketch's banding for the threshold over 128 values."""

    def __init__(self, threshold: float) -> None:
        from datasketch import MinHash, MinHashLSH

        self.minhash, self.threshold = MinHash, threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=128)
        self.signatures: dict = {}

    def is_duplicate(self, text: str, key):
        m = self.minhash(num_perm=128, seed=1)
        m.update_batch(list(shingles(text, 5)))
        for other in self.lsh.query(m):
            if m.jaccard(self.signatures[other]) >= self.threshold:
                return other
        self.lsh.insert(key, m)
        self.signatures[key] = m
        return None


def _planted(dedup, pairs, threshold: float) -> tuple[float, float]:
    for i, (a, _, _) in enumerate(pairs):
        dedup.is_duplicate(a, f"doc{i}")
    removed = [dedup.is_duplicate(b, f"copy{i}") is not None for i, (_, b, _) in enumerate(pairs)]
    above = [r for r, (_, _, j) in zip(removed, pairs) if j >= threshold + 0.05]
    below = [r for r, (_, _, j) in zip(removed, pairs) if j <= threshold - 0.1]
    return sum(above) / len(above), sum(below) / len(below)


def main() -> int:
    import json

    from bench_data_tools import build_corpus
    from test_curate import _planted_pairs

    p = argparse.ArgumentParser()
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    t = args.threshold
    load_before = os.getloadavg()[0]
    pairs = _planted_pairs(args.pairs, seed=7, edits=25)
    quality = {name: _planted(cls(t), pairs, t) for name, cls in (("before", Before), ("after", NearDedup))}
    corpus = Path(f"/tmp/bench_near_dedup_x{args.copies}.jsonl")
    if not corpus.is_file():
        build_corpus(corpus, args.copies)
    texts = [json.loads(line)["text"] for line in corpus.open()]
    rates: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, cls in (("before", Before), ("after", NearDedup)):
            d = cls(t)
            t0 = time.perf_counter()
            removed = sum(d.is_duplicate(x, i) is not None for i, x in enumerate(texts))
            rates[name].append(len(texts) / (time.perf_counter() - t0))
    after, before = NearDedup(t), Before(t).lsh
    print(f"threshold {t}; after: {after.num_perm} values, {after.bands} bands × {after.rows} rows "
          f"(candidate at J = {t}: {candidate_probability(t, after.bands, after.rows):.3f}); before: 128 values, "
          f"{before.b} × {before.r} ({candidate_probability(t, before.b, before.r):.2f}); load average "
          f"{load_before:.1f} → {os.getloadavg()[0]:.1f}")
    print(f"| near dedup | recall, J ≥ {t + 0.05:.2f} | false removals, J ≤ {t - 0.1:.2f} | docs/s (KJV×{args.copies}, "
          f"{len(texts):,} docs; {removed} removed) |")
    print("|---|---|---|---|")
    for name in ("before", "after"):
        rec, false = quality[name]
        print(f"| {name} | {100 * rec:.1f}% | {100 * false:.1f}% | {statistics.median(rates[name]):,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
