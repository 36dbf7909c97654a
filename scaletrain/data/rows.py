"""Rows of the data tools' inputs, read as a stream: one dict per row, in file order, a row at a time.

`data preprocess` and `data curate` hold no more of a corpus than the batch they work on. HF `datasets`
reads these formats too, but even in streaming mode its JSON path parses 10 MB chunks with pyarrow's
threaded reader and keeps ~250 MB resident for it; the common formats are read here with the standard
library instead, row for row as `datasets` reads them (tests/test_preprocess_stream.py compares):

- JSON lines (.jsonl / .json / .ndjson, optionally .gz / .bz2 / .xz): one object per line, blank lines
  skipped, a leading byte-order mark ignored. A .json file holding one array (or one object over several
  lines) is read whole by `datasets`, as before — it cannot be streamed.
- text (.txt): one row per line (`\\n`, `\\r\\n` or `\\r`), {"text": line} without its line break.
- parquet: pyarrow record batches.
Other compressions (.zst) go through `datasets` streaming.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_BOM = b"\xef\xbb\xbf"


def _opener(path: str):
    """How to open `path` as bytes (None: a compression only `datasets` reads)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".zst", ".zstd", ".lz4"):
        return None
    return _OPENERS.get(suffix, open)


def iter_rows(paths: list[str], fmt: str, *, batch_rows: int = 1024) -> Iterator[dict[str, Any]]:
    """Every row of `paths` (all of one format: json, text or parquet), file after file."""
    for path in paths:
        opener = _opener(path)
        if opener is None:
            yield from _datasets_rows(path, fmt)
        elif fmt == "json":
            yield from _json_rows(path, opener)
        elif fmt == "text":
            with opener(path, "rt", encoding="utf-8") as f:
                for line in f:
                    yield {"text": line.rstrip("\n")}
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                yield from batch.to_pylist()
        else:
            raise ValueError(f"{path}: unknown input format {fmt!r}")


def _json_rows(path: str, opener) -> Iterator[dict[str, Any]]:
    with opener(path, "rb") as f:
        head = f.read(len(_BOM))
        if head != _BOM:
            f.seek(0)
        if f.read(1) == b"[":  # one JSON array: `datasets` reads it whole, as it always did
            yield from _datasets_rows(path, "json")
            return
        f.seek(len(_BOM) if head == _BOM else 0)
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                if n == 1:  # one object spread over several lines: `datasets` reads it whole
                    yield from _datasets_rows(path, "json")
                    return
                raise ValueError(f"{path} line {n} is not valid JSON ({e}); fix or remove that line.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {n} holds {type(row).__name__}, not a JSON object (one row per line).")
            yield row


def _datasets_rows(path: str, fmt: str) -> Iterator[dict[str, Any]]:
    import datasets

    yield from datasets.load_dataset(fmt, data_files=[path], split="train", streaming=True)


def text_batches(rows: Iterable[dict[str, Any]], text_key: str, batch_rows: int) -> Iterator[list[Any]]:
    """The `text_key` values of `rows`, `batch_rows` at a time (None where a row lacks the field).
    KeyError when no row of the first batch has the field."""
    batch: list[Any] = []
    first = True
    fields: set[str] = set()
    for row in rows:
        batch.append(row.get(text_key))
        if first:
            fields.update(row)
        if len(batch) == batch_rows:
            _check_field(first, fields, text_key)
            first = False
            yield batch
            batch = []
    if batch:
        _check_field(first, fields, text_key)
        yield batch


def _check_field(first: bool, fields: set[str], text_key: str) -> None:
    if first and text_key not in fields:
        raise KeyError(f"inputs have no '{text_key}' field (fields: {', '.join(sorted(fields))}); "
                       "pass --text-key with the field that holds the text.")
