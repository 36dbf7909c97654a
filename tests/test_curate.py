"""Data curation: each Gopher rule on a document built to break it (and ordinary prose passing),
exact and near-duplicate removal, n-gram decontamination, and `scaletrain data curate` end to end
into `data preprocess`, with its report and clear errors."""

from __future__ import annotations

import json

import pytest

from scaletrain.cli import main
from scaletrain.data.decontaminate import Decontaminator
from scaletrain.data.dedup import ExactDedup, jaccard
from scaletrain.data.near_dedup import NearDedup
from scaletrain.data.quality import quality_problem

pytestmark = pytest.mark.e2e

PROSE = ("The river ran past the old mill, and the miller's daughter watched it from the bridge each morning. "
         "She had learned to read the water: when it rose brown and fast, rain had fallen in the hills, and "
         "when it ran clear and slow, the summer had settled in. Her father said that a mill was only as good "
         "as the river that turned it, and that a miller who did not watch the water would soon have nothing "
         "to grind. So she watched, and she wrote down what she saw in a small book with a green cover.")


EVAL = ("Far to the north the snow lay deep on the passes, and the traders waited in the valley towns for the "
        "thaw that would open the road again. When does the road open?")


def _variant(text: str, k: int) -> str:
    """`text` with its k-th word replaced: a near duplicate."""
    words = text.split()
    words[k] = "copper"
    return " ".join(words)


def test_ordinary_prose_passes_and_each_rule_fires():
    assert quality_problem(PROSE) is None
    cases = {
        "too few words": "A short note with the words of a sentence.",
        "mean word length out of range": " ".join(["a of to the be and that with"] * 10),
        "too many symbols": PROSE + " #" * 20 + " ..." * 20,
        "mostly bullet lines": "\n".join(f"- item {i} of the list and the rest with more" for i in range(12)),
        "too few alphabetic words": PROSE + " " + " ".join(f"{i:06d}" for i in range(400)),
        "too few English stop words": " ".join(f"word{i} lorem ipsum dolor sit amet" for i in range(12)),
        "repeated lines": "\n".join(["The same line with the words of that and to be."] * 8 + [PROSE]),
    }
    for reason, text in cases.items():
        assert quality_problem(text) == reason, (reason, quality_problem(text))
    looped = PROSE + " " + " ".join(["the mill and the river and the water"] * 12)
    assert quality_problem(looped).startswith(("a repeated", "duplicated"))


def test_exact_dedup_ignores_case_and_spacing():
    d = ExactDedup()
    assert not d.is_duplicate(PROSE)
    assert d.is_duplicate("  " + PROSE.upper().replace(" ", "\n  "))
    assert not d.is_duplicate(PROSE + " Another sentence.")


def test_near_dedup_catches_edited_copies_and_keeps_distinct_documents():
    other = " ".join(reversed(PROSE.split()))
    near = _variant(PROSE, 40)
    assert jaccard(PROSE, near) > 0.8 > jaccard(PROSE, other)
    d = NearDedup(threshold=0.8)
    assert d.is_duplicate(PROSE, "a") is None
    assert d.is_duplicate(near, "b") == "a"
    assert d.is_duplicate(other, "c") is None
    twice = _variant(_variant(PROSE, 10), 70)  # two edits: Jaccard ≈ 0.8, so a lower threshold catches it
    loose = NearDedup(threshold=0.6)
    assert loose.is_duplicate(PROSE, "a") is None and loose.is_duplicate(twice, "d") == "a"
    with pytest.raises(ValueError, match="threshold"):
        NearDedup(threshold=1.5)


def test_decontamination_finds_shared_ngrams_and_verbatim_short_questions():
    d = Decontaminator(13)
    question = "Eva has 15 cards and gives away 1. How many cards are left?"  # 12 words: kept whole
    d.add_eval_rows([{"messages": [{"role": "user", "content": question}], "answer": "The answer is 14."},
                     {"text": PROSE}], "test.jsonl")
    assert d.contaminated_by("Homework: eva has 15 cards, and gives away 1 -- how many cards are left? Easy.") == "test.jsonl"
    window = " ".join(PROSE.split()[20:33])  # any 13 consecutive words of an evaluation text
    assert d.contaminated_by("Unrelated opening. " + window + " unrelated ending.") == "test.jsonl"
    assert d.contaminated_by(" ".join(PROSE.split()[20:32])) is None  # 12 words of it: not enough
    assert d.contaminated_by("The answer is 14. The answer is 14.") is None  # too generic to be a leak


def test_curate_command_end_to_end(tmp_path, tokenizer_dir, capsys):
    rows = [{"id": 0, "text": PROSE}, {"id": 1, "text": PROSE.upper()}, {"id": 2, "text": _variant(PROSE, 30)},
            {"id": 3, "text": "Too short."}, {"id": 4, "text": " ".join(reversed(PROSE.split()))},
            {"id": 5, "text": EVAL + " " + " ".join(reversed(PROSE.split()[:60]))}]
    src, ev, out = tmp_path / "raw.jsonl", tmp_path / "eval.jsonl", tmp_path / "clean" / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.write_text(json.dumps({"prompt": EVAL, "answer": "spring"}) + "\n")
    assert main(["data", "curate", "--input", str(src), "--output", str(out), "--decontaminate", str(ev)]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in kept] == [0, 4] and kept[0] == rows[0]  # every field kept
    report = json.loads(out.with_name("out.jsonl.report.json").read_text())
    assert report["rows"] == 6 and report["kept"] == 2
    assert report["removed"] == {"exact duplicate": 1, "near duplicate": 1, "quality: too few words": 1,
                                 "contaminated: eval.jsonl": 1}
    assert "kept 2 (33.3%)" in capsys.readouterr().out
    # The curated file is a corpus like any other.
    assert main(["data", "preprocess", "--input", str(out), "--tokenizer", str(tokenizer_dir),
                 "--output-prefix", str(tmp_path / "clean_doc")]) == 0
    assert (tmp_path / "clean_doc.idx").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--dedup", "fuzzy"], "--dedup fuzzy"),
    (["--decontaminate", "missing.jsonl"], "not found: missing.jsonl"),
    (["--text-key", "body"], "no 'body' field"),
])
def test_curate_refuses_bad_input_clearly(tmp_path, capsys, extra, message):
    src = tmp_path / "raw.jsonl"
    src.write_text(json.dumps({"text": PROSE}) + "\n")
    assert main(["data", "curate", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def _planted_pairs(n: int, seed: int, edits: int, words: int = 400) -> list[tuple[str, str, float]]:
    """(document, edited copy, their exact shingle Jaccard) with edits spread so the similarities span
    down from 1 (to ~0.5 with 25 edits at most, ~0.4 with 40): random words from a large vocabulary (unrelated documents share no shingle), then m of
    the copy's words replaced by fresh ones."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = [f"w{rng.randrange(10**7)}" for _ in range(words)]
        copy = list(base)
        for pos in rng.sample(range(words), rng.randrange(0, edits)):
            copy[pos] = f"x{i}n{pos}"
        a, b = " ".join(base), " ".join(copy)
        out.append((a, b, jaccard(a, b)))
    return out


@pytest.mark.parametrize("threshold,pairs,edits", [(0.8, 700, 25), (0.6, 300, 40)])
def test_near_dedup_recall_and_false_removals_on_planted_pairs(threshold, pairs, edits):
    """Every pair at Jaccard ≥ threshold + 0.05 is removed (recall ≥ 0.99) and ≤ 1% of those at
    ≤ threshold − 0.1; the banding makes pairs at the threshold candidates with probability ≥ 0.99.
    (datasketch's default banding, 9 bands of 13 over 128 values at 0.8, with its estimate: 91% above 0.85
    here; 96% above 0.65 at 0.6.)"""
    from scaletrain.data.near_dedup import candidate_probability

    d = NearDedup(threshold=threshold)
    assert candidate_probability(threshold, d.bands, d.rows) >= 0.99 and d.bands * d.rows <= d.num_perm
    planted = _planted_pairs(pairs, seed=int(threshold * 10), edits=edits)
    for i, (a, _, _) in enumerate(planted):
        assert d.is_duplicate(a, f"doc{i}") is None  # unrelated documents: never candidates of each other
    removed = [d.is_duplicate(b, f"copy{i}") for i, (_, b, _) in enumerate(planted)]
    assert all(r in (None, f"doc{i}") for i, r in enumerate(removed))  # a copy is matched to its own original
    above = [r is not None for r, (_, _, j) in zip(removed, planted) if j >= threshold + 0.05]
    below = [r is not None for r, (_, _, j) in zip(removed, planted) if j <= threshold - 0.1]
    assert len(above) >= 100 and len(below) >= 50, (len(above), len(below))
    assert sum(above) / len(above) >= 0.99, (sum(above), len(above))
    assert sum(below) / len(below) <= 0.01, (sum(below), len(below))


def test_band_index_finds_every_document_sharing_a_band():
    """The near-dedup index (a sorted array plus a dict of the newest entries, merged every few inserts)
    returns exactly the documents that share a band key with the query, merged or not yet."""
    import numpy as np

    from scaletrain.data.near_dedup import BandIndex

    index = BandIndex(merge_every=10)
    keys = np.random.default_rng(0).integers(0, 50, size=(41, 3), dtype=np.uint64)
    for doc, k in enumerate(keys):
        index.insert(k, doc)
    assert len(index.keys) == 120 and len(index.recent) == 3  # 40 documents merged, the last one not yet
    for k in keys:
        assert index.query(k) == {d for d, other in enumerate(keys) if set(k.tolist()) & set(other.tolist())}
