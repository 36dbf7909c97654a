"""`data preprocess` as a stream: the .bin/.idx bytes are those the previous pipeline wrote (HF `datasets`
loaded whole and mapped, megatron.core's IndexedDatasetBuilder) for every input format, both tokenizer
kinds and the BOS/EOD options; a failed run leaves no files; and peak memory does not grow with the
corpus (a corpus 8× larger, measured in fresh processes)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from scaletrain.data.preprocess import BUILTIN_CORPUS, preprocess, token_dtype
from scaletrain.data.tokenizer import load_tokenizer

from conftest import REPO, corpus_texts

pytestmark = pytest.mark.e2e


def _previous_pipeline(inputs: list[str], tokenizer: str, prefix: str, *, append_eod: bool = True,
                       add_bos: bool = False) -> None:
    """What `preprocess` did before it streamed (the reference for its bytes)."""
    import warnings

    import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from scaletrain.data.preprocess import input_format

    tok = load_tokenizer(tokenizer)

    def tokenize(batch):
        ids = tok.encode_batch([t or "" for t in batch["text"]])
        pre = [tok.bos_id] if add_bos and tok.bos_id is not None else []
        suf = [tok.eos_id] if append_eod else []
        return {"ids": [pre + x + suf if x else [] for x in ids]}

    with tempfile.TemporaryDirectory() as cache:
        ds = datasets.load_dataset(input_format(inputs, "preprocess"), data_files=inputs, split="train", cache_dir=cache)
        ds = ds.map(tokenize, batched=True, batch_size=256, remove_columns=ds.column_names)
        dtype = token_dtype(tok.vocab_size)
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
        for batch in ds.with_format("numpy").iter(batch_size=1024):
            for ids in batch["ids"]:
                if len(ids):
                    arr = np.asarray(ids, dtype=dtype)
                    builder.add_document(arr, [arr.size])
        builder.finalize(f"{prefix}.idx")


def _same_bytes(a: str, b: str) -> bool:
    return all(Path(f"{a}.{ext}").read_bytes() == Path(f"{b}.{ext}").read_bytes() for ext in ("bin", "idx"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, list[str]]:
    """Every input format, with awkward rows: null and empty texts, a BOM, blank lines, \\r\\n and U+2028."""
    d = tmp_path_factory.mktemp("formats")
    texts = corpus_texts(60)
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)] + [{"id": -1, "text": None}, {"id": -2, "text": ""},
                                                                  {"id": -3, "text": "a line\r\nbreak \u2028 here"}]
    (d / "a.jsonl").write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows[:40]) + "\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[40:]))
    (d / "c.json").write_text(json.dumps(rows[10:30]))
    (d / "d.txt").write_text("In the beginning\r\nGod created\n\nthe heaven\x0cand the earth\rAmen\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [r["text"] for r in rows], "id": [r["id"] for r in rows]}), d / "e.parquet",
                   row_group_size=16)
    return {"jsonl+gz": [str(d / "a.jsonl"), str(d / "b.jsonl.gz")], "json array": [str(d / "c.json")],
            "text": [str(d / "d.txt")], "parquet": [str(d / "e.parquet")], "bundled": [str(BUILTIN_CORPUS)]}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_texts(100), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|end_of_text|>", "<|begin_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("hftok")
    tok.save(str(out / "tokenizer.json"))
    return str(out)


@pytest.mark.parametrize("kind", ["jsonl+gz", "json array", "text", "parquet", "bundled"])
def test_bytes_equal_the_previous_pipeline(tmp_path, inputs, tokenizer_dir, hf_tokenizer, kind):
    for tok_name, tok in (("sp", str(tokenizer_dir)), ("hf", hf_tokenizer)):
        if kind == "bundled" and tok_name == "hf":
            continue  # (the whole Bible: once is enough)
        for opts in ({}, {"append_eod": False, "add_bos": True})[: 1 if kind == "bundled" else 2]:
            ref, new = str(tmp_path / f"ref_{tok_name}"), str(tmp_path / f"new_{tok_name}")
            _previous_pipeline(inputs[kind], tok, ref, **opts)
            stats = preprocess(inputs[kind], tok, new, workers=2, batch_size=7, **opts)  # batches cut mid-file
            assert _same_bytes(ref, new), (kind, tok_name, opts)
            meta = json.loads(Path(f"{new}.meta.json").read_text())
            assert meta["documents"] == stats.documents > 0 and meta["tokens"] == stats.tokens
            ids = np.fromfile(f"{new}.bin", dtype=token_dtype(load_tokenizer(tok).vocab_size))
            assert meta["max_token_id"] == int(ids.max()) and len(ids) == stats.tokens


def test_a_failed_run_leaves_nothing(tmp_path, tokenizer_dir):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in corpus_texts(3)))
    with pytest.raises(KeyError, match="no 'text' field .*body"):
        preprocess([str(src)], str(tokenizer_dir), str(tmp_path / "out"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        preprocess([str(empty)], str(tokenizer_dir), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "rows.jsonl"]


_MEASURE = """
import sys
from scaletrain.data.preprocess import preprocess
preprocess([sys.argv[1]], sys.argv[2], sys.argv[3], workers=1, batch_size=256)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""  # VmHWM: this process's peak RSS (ru_maxrss would include the forking parent's)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, tokenizer_dir):
    """Fresh processes on the bundled corpus (4 MB) and on 8 copies of it (33 MB): the peak resident memory
    differs by under 24 MiB (the previous pipeline's grew by ~140 MiB: its whole mapped dataset)."""
    texts = corpus_texts()
    rss = {}
    for copies in (1, 8):
        src = tmp_path / f"x{copies}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for _ in range(copies) for t in texts))
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tokenizer_dir), str(tmp_path / f"o{copies}")],
                             capture_output=True, text=True, check=True, cwd=REPO)
        rss[copies] = int(out.stdout.split()[-1]) / 1024  # MiB
    assert rss[8] - rss[1] < 24, rss
