"""Up-front checks of Megatron .bin/.idx datasets, before megatron.core opens them.

megatron.core trusts its files (a bad header is a bare AssertionError, a truncated file a crash or
garbage deep in training). We read the index ourselves and check it against the file sizes (and
every sequence pointer against the lengths), and scan the .bin for ids the vocabulary cannot hold,
so a corrupt, truncated or foreign dataset fails at start-up with the file named and the fix.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes.
_DTYPES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class IndexedInfo:
    prefix: str
    dtype: type[np.number]
    sequences: int
    documents: int
    tokens: int
    meta: dict | None


def _fix(prefix: str) -> str:
    return f"re-create it with `scaletrain data preprocess ... --output-prefix {prefix}`"


def check_indexed_dataset(prefix: str) -> IndexedInfo:
    """Validate `prefix`.idx/.bin structurally and return its sizes (and the .meta.json sidecar)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for p in (idx, bin_):
        if not p.is_file():
            raise DatasetError(f"data prefix {prefix}: {p} does not exist; check data.prefixes or {_fix(prefix)}.")
    size = idx.stat().st_size
    with idx.open("rb") as f:
        head = f.read(len(_HEADER) + 8 + 1 + 8 + 8)
        if len(head) < 34 or not head.startswith(_HEADER):
            raise DatasetError(f"{idx} is not a Megatron index file (bad header); it is corrupt — {_fix(prefix)}.")
        (version,) = struct.unpack("<Q", head[9:17])
        (code,) = struct.unpack("<B", head[17:18])
        sequences, documents = struct.unpack("<QQ", head[18:34])
        if version != 1 or code not in _DTYPES:
            raise DatasetError(f"{idx}: unsupported version {version} or dtype code {code}; it is corrupt — {_fix(prefix)}.")
        expected = 34 + sequences * (4 + 8) + documents * 8
        if size not in (expected, expected + sequences):  # + one int8 mode per sequence if multimodal
            raise DatasetError(f"{idx} is truncated or corrupt ({size} bytes, expected {expected}); {_fix(prefix)}.")
        lengths = np.frombuffer(f.read(sequences * 4), dtype=np.int32)
        pointers = np.frombuffer(f.read(sequences * 8), dtype=np.int64)
        doc_idx = np.frombuffer(f.read(documents * 8), dtype=np.int64)
    dtype = _DTYPES[code]
    tokens = int(lengths.sum(dtype=np.int64))
    if (lengths < 0).any() or documents == 0 or doc_idx[0] != 0 or doc_idx[-1] != sequences or (np.diff(doc_idx) < 0).any():
        raise DatasetError(f"{idx} has inconsistent lengths or document boundaries; it is corrupt — {_fix(prefix)}.")
    _check_pointers(idx, prefix, lengths, pointers, np.dtype(dtype).itemsize)
    bin_size = bin_.stat().st_size
    if bin_size != tokens * np.dtype(dtype).itemsize:
        raise DatasetError(f"{bin_} has {bin_size} bytes but {idx} describes {tokens} tokens of "
                           f"{np.dtype(dtype).name}; the pair does not match — {_fix(prefix)}.")
    meta_path = Path(f"{prefix}.meta.json")
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetError(f"{meta_path} is not valid JSON ({e}); delete it (the dataset is then checked by a "
                               f"scan) or {_fix(prefix)}.") from None
        if not isinstance(meta, dict):
            raise DatasetError(f"{meta_path} holds no JSON object; delete it or {_fix(prefix)}.")
    return IndexedInfo(prefix, dtype, sequences, documents - 1, tokens, meta)


def _check_pointers(idx: Path, prefix: str, lengths: np.ndarray, pointers: np.ndarray, itemsize: int) -> None:
    """Sequence i starts where i-1 ends (Megatron's writer lays them out back to back): a pointer that
    disagrees would read another sequence's tokens, or past the end of the .bin, silently."""
    expected = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
    expected *= itemsize
    bad = np.flatnonzero(pointers != expected)
    if bad.size:
        i = int(bad[0])
        raise DatasetError(f"{idx}: the pointer of sequence {i} is {int(pointers[i])} but the lengths before it put "
                           f"it at byte {int(expected[i])} ({bad.size} sequence(s) disagree); the index is corrupt — "
                           f"{_fix(prefix)}.")


def document_count(prefix: str) -> int:
    """Documents in `prefix`.idx, from its header (checked by check_indexed_dataset beforehand)."""
    with open(f"{prefix}.idx", "rb") as f:
        head = f.read(34)
    return struct.unpack("<Q", head[26:34])[0] - 1


def file_stamp(path: str | Path) -> list[int]:
    """[size, mtime in ns] of a file: changes whenever the file is rewritten (used as a cache key)."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def max_token_id(info: IndexedInfo) -> int:
    """Largest token id in the .bin, by a vectorised scan of the memory-mapped file.

    The sidecar's `max_token_id` is not trusted (a .bin replaced by another tool keeps the old
    sidecar); the scan's result is cached in PREFIX/cache/ (where Megatron keeps its index cache),
    keyed by the .bin's size and mtime, so a dataset is scanned once per version, not once per start.
    """
    bin_ = Path(f"{info.prefix}.bin")
    cache = Path(info.prefix) / "cache" / "scaletrain_max_token_id.json"
    stamp = file_stamp(bin_)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("bin") == stamp:
            return int(cached["max_token_id"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass  # absent, unreadable or stale: scan
    top = 0
    if info.tokens:
        data = np.memmap(bin_, dtype=info.dtype, mode="r")
        chunk = 1 << 26  # 64 Mi tokens at a time: bounded memory, still vectorised
        top = max(int(data[i : i + chunk].max()) for i in range(0, len(data), chunk))
    try:  # best effort: a read-only dataset is simply scanned again next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"bin": stamp, "max_token_id": top}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return top


def check_vocab(info: IndexedInfo, *, model_vocab: int, tokenizer_vocab: int, tokenizer_sha256: str | None) -> None:
    """Fail fast when a dataset was written by another tokenizer or holds ids the model cannot embed."""
    meta = info.meta or {}
    if meta.get("tokenizer_vocab_size") not in (None, tokenizer_vocab):
        raise DatasetError(
            f"dataset {info.prefix} was tokenized with a {meta['tokenizer_vocab_size']}-token tokenizer "
            f"({meta.get('tokenizer')}) but data.tokenizer has {tokenizer_vocab} tokens; point data.tokenizer at "
            "the tokenizer that wrote the data, or re-run `scaletrain data preprocess` with this one.")
    if tokenizer_sha256 and meta.get("tokenizer_sha256") not in (None, tokenizer_sha256):
        raise DatasetError(
            f"dataset {info.prefix} was tokenized with a different tokenizer ({meta.get('tokenizer')}) than "
            "data.tokenizer (same size, different file); use the same tokenizer or re-run preprocessing.")
    top = max_token_id(info)
    claim = f" ({info.prefix}.meta.json claims at most {meta['max_token_id']})" \
        if meta.get("max_token_id") not in (None, top) else ""
    if top >= model_vocab:
        raise DatasetError(
            f"dataset {info.prefix} contains token id {top}{claim} but model.vocab_size is {model_vocab}; set "
            "model.vocab_size = 0 (derive from the tokenizer) or at least the tokenizer's size.")
    if top >= tokenizer_vocab:  # embeddable (padded vocabulary), but no token of this tokenizer
        raise DatasetError(
            f"dataset {info.prefix} contains token id {top}{claim} but data.tokenizer has {tokenizer_vocab} tokens; "
            "it was written by another tokenizer or is corrupt — re-run `scaletrain data preprocess` with "
            "data.tokenizer.")
