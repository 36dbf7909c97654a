"""Up-front checks of Megatron .bin/.idx datasets, before megatron.core opens them.

megatron.core trusts its files (a bad header is a bare AssertionError, a truncated file a crash or
garbage deep in training). We read the small index header ourselves and check it against the
file sizes, so a corrupt or truncated dataset fails at start-up with the file named and the fix.
"""

from __future__ import annotations

import json
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
        f.seek(34 + sequences * 12)
        doc_idx = np.frombuffer(f.read(documents * 8), dtype=np.int64)
    dtype = _DTYPES[code]
    tokens = int(lengths.sum(dtype=np.int64))
    if (lengths < 0).any() or documents == 0 or doc_idx[0] != 0 or doc_idx[-1] != sequences or (np.diff(doc_idx) < 0).any():
        raise DatasetError(f"{idx} has inconsistent lengths or document boundaries; it is corrupt — {_fix(prefix)}.")
    bin_size = bin_.stat().st_size
    if bin_size != tokens * np.dtype(dtype).itemsize:
        raise DatasetError(f"{bin_} has {bin_size} bytes but {idx} describes {tokens} tokens of "
                           f"{np.dtype(dtype).name}; the pair does not match — {_fix(prefix)}.")
    meta_path = Path(f"{prefix}.meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    return IndexedInfo(prefix, dtype, sequences, documents - 1, tokens, meta)


def max_token_id(info: IndexedInfo) -> int:
    """Largest token id in the dataset: from the sidecar if scaletrain wrote it, else by a scan of the .bin."""
    if info.meta and "max_token_id" in info.meta:
        return int(info.meta["max_token_id"])
    data = np.memmap(f"{info.prefix}.bin", dtype=info.dtype, mode="r")
    chunk = 1 << 26
    return int(max(int(data[i : i + chunk].max()) for i in range(0, len(data), chunk)))


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
    if top >= model_vocab:
        raise DatasetError(
            f"dataset {info.prefix} contains token id {top} but model.vocab_size is {model_vocab}; set "
            "model.vocab_size = 0 (derive from the tokenizer) or at least the tokenizer's size.")
