"""Malformed text inputs of `data tokenizer`, `data preprocess` and `data curate`, named precisely.

HF `datasets` reads the inputs fast, but its errors on bad input are generic ("An error occurred while
generating the dataset", a pyarrow parse error with a row number inside a block) and a text field
holding a number or a list reaches the tokenizer as a TypeError. Here the loader's errors become a
ValueError naming the file and line, found by re-reading JSON-lines inputs with the `json` module —
on the error path only, so well-formed inputs cost nothing extra.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _is_json(path: Path) -> bool:
    """A JSON input this module can re-read: plain or gzip (other compressions are left to the loader)."""
    return path.name.lower().removesuffix(".gz").endswith(_JSON_SUFFIXES)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def not_text(where: str, text_key: str, value: Any) -> str:
    return (f"{where}: field '{text_key}' holds {_kind(value)} ({json.dumps(value, default=str)[:60]}), not a "
            "string; fix the row, or pass --text-key with the field that holds the text.")


def first_bad_line(inputs: Iterable[str], text_key: str) -> str | None:
    """'FILE line N: …' for the first line of a JSON input that is not valid JSON or whose text field is
    neither a string nor null; None when every line is fine (or no input is JSON)."""
    for name in inputs:
        path = Path(name)
        if not _is_json(path):
            continue
        try:
            with _open_text(path) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        if n == 1 and not path.name.lower().removesuffix(".gz").endswith(".jsonl"):
                            return _whole_document_problem(path, text_key)
                        return f"{path} line {n} is not valid JSON ({e}); fix or remove that line."
                    if not isinstance(row, dict):
                        return f"{path} line {n} holds {_kind(row)}, not a JSON object (one row per line)."
                    value = row.get(text_key)
                    if value is not None and not isinstance(value, str):
                        return not_text(f"{path} line {n}", text_key, value)
        except (OSError, UnicodeDecodeError, EOFError) as e:
            return f"{path} cannot be read as text ({e}); is it truncated, or not {path.suffix[1:]}?"
    return None


def _whole_document_problem(path: Path, text_key: str) -> str | None:
    """A .json input holding one document (a list of rows) rather than one row per line."""
    try:
        with _open_text(path) as f:
            doc = json.load(f)
    except ValueError as e:
        return f"{path} is not valid JSON ({e}); fix the file."
    rows = doc if isinstance(doc, list) else [doc]
    for i, row in enumerate(rows, 1):
        value = row.get(text_key) if isinstance(row, dict) else None
        if value is not None and not isinstance(value, str):
            return not_text(f"{path} row {i}", text_key, value)
    return None


def _loader_errors() -> tuple[type[BaseException], ...]:
    import pyarrow
    from datasets.exceptions import DatasetGenerationError

    return DatasetGenerationError, pyarrow.ArrowException


@contextlib.contextmanager
def malformed_input(inputs: list[str], text_key: str) -> Iterator[None]:
    """Turn the loader's errors on malformed input into a ValueError naming the file and line."""
    try:
        yield
    except _loader_errors() as e:
        where = first_bad_line(inputs, text_key)
        cause = e.__cause__ or e
        raise ValueError(where or f"cannot read {', '.join(inputs)}: {cause}") from None


def checked_rows(rows: Iterable[dict], inputs: list[str], text_key: str) -> Iterator[dict]:
    """`rows` (a streaming dataset), with loader errors named and a text field that is neither a string
    nor null refused (file and line where the inputs are JSON)."""
    with malformed_input(inputs, text_key):
        for i, row in enumerate(rows):
            value = row.get(text_key)
            if value is not None and not isinstance(value, str):
                raise ValueError(first_bad_line(inputs, text_key)
                                 or not_text(f"row {i + 1} of {', '.join(inputs)}", text_key, value))
            yield row


def check_text_column(features: Any, inputs: list[str], text_key: str) -> None:
    """A loaded (non-streaming) dataset's text column must hold strings."""
    feature = features.get(text_key) if features is not None else None
    if feature is None or getattr(feature, "dtype", None) in ("string", "large_string"):
        return
    raise ValueError(first_bad_line(inputs, text_key)
                     or f"field '{text_key}' of {', '.join(inputs)} holds {feature}, not strings; pass --text-key "
                        "with the field that holds the text.")
