"""`scaletrain data curate`: quality filtering, deduplication and decontamination of a text corpus.

Input: jsonl/json/parquet files (gzip ok) with a text field, read a row at a time (data/rows.py), so
memory holds the dedup indices (~2 KB per kept document), not the corpus. Output: one jsonl file of
the kept rows, every field preserved, written atomically, plus OUTPUT.report.json with the counts by stage and
reason, a few removed examples per reason, and the throughput. The output feeds
`scaletrain data preprocess` unchanged.

Stages, cheapest first, each seeing only what the previous kept:
  1. quality   Gopher's heuristic rules (data/quality.py)            --quality gopher|none
  2. exact     normalised-text hash dedup (data/dedup.py)             --dedup exact,near | exact | near | none
  3. near      MinHash LSH near-duplicate dedup, Jaccard ≥ threshold  --near-threshold 0.8
               (data/near_dedup.py: banded for recall ≥ 0.99 at the threshold, estimate verified)
  4. decontam  13-gram overlap with evaluation files                  --decontaminate eval.jsonl …
Mixing ratios are the trainer's job: curate each source, preprocess it, and weight the prefixes with
`data.weights`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from scaletrain.data.decontaminate import Decontaminator
from scaletrain.data.dedup import ExactDedup
from scaletrain.data.inputs import checked_rows
from scaletrain.data.near_dedup import NearDedup
from scaletrain.data.preprocess import input_format
from scaletrain.data.quality import QualityConfig, quality_problem
from scaletrain.data.rows import iter_rows

DEDUP_MODES = ("exact", "near")
EXAMPLES_PER_REASON = 3


@dataclass
class CurationReport:
    rows: int = 0
    kept: int = 0
    removed: Counter = field(default_factory=Counter)  # "stage: reason" → count
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0

    def remove(self, reason: str, text: str) -> None:
        self.removed[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(text[:200])

    def line(self) -> str:
        removed = ", ".join(f"{n} {r}" for r, n in self.removed.most_common()) or "none"
        rate = self.rows / self.seconds if self.seconds else 0.0
        return (f"curated {self.rows} documents: kept {self.kept} ({100 * self.kept / max(self.rows, 1):.1f}%), "
                f"removed: {removed}; {rate:,.0f} docs/s")

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "removed": dict(self.removed.most_common()),
                "examples": dict(self.examples), "seconds": round(self.seconds, 3)}


@contextlib.contextmanager
def _removed_on_error(tmp: Path) -> Iterator[TextIO]:
    """`tmp` open for writing; deleted if the run fails (a failed curate leaves no OUTPUT.tmp-* behind)."""
    try:
        with open(tmp, "w") as f:
            yield f
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_rows(paths: list[str]):
    return iter_rows(list(paths), input_format(paths, "curate"))


def curate(inputs: list[str], output: str, *, text_key: str = "text", quality: str = "gopher",
           dedup: tuple[str, ...] = DEDUP_MODES, near_threshold: float = 0.8, decontaminate: tuple[str, ...] = (),
           ngram: int = 13, quality_cfg: QualityConfig | None = None, log=print) -> CurationReport:
    """Run the stages over `inputs`, write the kept rows to `output` (jsonl) and its report; see the module."""
    quality_cfg = quality_cfg or QualityConfig()
    if quality not in ("gopher", "none"):
        raise ValueError(f"--quality {quality!r}: choose 'gopher' or 'none'")
    unknown = [m for m in dedup if m not in DEDUP_MODES]
    if unknown:
        raise ValueError(f"--dedup {','.join(unknown)}: choose from {', '.join(DEDUP_MODES)} (comma-separated) or none")
    missing = [p for p in decontaminate if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"evaluation file(s) to decontaminate against not found: {', '.join(missing)}")
    rows = _read_rows(inputs)
    exact = ExactDedup() if "exact" in dedup else None
    near = NearDedup(near_threshold) if "near" in dedup else None
    decon = None
    if decontaminate:
        decon = Decontaminator(ngram)
        for path in decontaminate:
            decon.add_eval_rows(_read_rows([path]), Path(path).name)
        log(f"decontamination: {len(decon.grams):,} {ngram}-grams and {len(decon.short):,} short texts from "
            f"{len(decontaminate)} evaluation file(s)")
    report = CurationReport()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    t0 = time.perf_counter()
    with _removed_on_error(tmp) as f:
        for i, row in enumerate(checked_rows(rows, list(inputs), text_key)):
            if i == 0 and text_key not in row:
                raise KeyError(f"input rows have no '{text_key}' field (fields: {', '.join(row)}); pass --text-key.")
            report.rows += 1
            text = row.get(text_key) or ""
            problem = quality_problem(text, quality_cfg) if quality == "gopher" else None
            if problem:
                report.remove(f"quality: {problem}", text)
                continue
            if exact is not None and exact.is_duplicate(text):
                report.remove("exact duplicate", text)
                continue
            if near is not None and near.is_duplicate(text, str(i)) is not None:
                report.remove("near duplicate", text)
                continue
            hit = decon.contaminated_by(text) if decon is not None else None
            if hit is not None:
                report.remove(f"contaminated: {hit}", text)
                continue
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            report.kept += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    report.seconds = time.perf_counter() - t0
    report_path = out.with_name(out.name + ".report.json")
    report_path.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    return report
