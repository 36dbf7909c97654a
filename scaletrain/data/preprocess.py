"""`scaletrain data preprocess`: text corpora → Megatron .bin/.idx through HF `datasets`.

Reading (jsonl / json / parquet / text, gzip welcome) and tokenisation run through
`datasets.Dataset.map` with `num_proc` worker processes and its progress bar; the token stream is
written with megatron.core's IndexedDatasetBuilder, so Megatron reads what we write and we read
what Megatron writes. A `PREFIX.meta.json` sidecar records which tokenizer wrote the data, so a
vocabulary mismatch is caught before training. Outputs appear atomically (temporary names, then
rename), so an interrupted run never leaves a half-written dataset under the final name.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scaletrain.data.inputs import check_text_column, malformed_input
from scaletrain.data.tokenizer import load_tokenizer

BUILTIN_CORPUS = Path(__file__).parent / "assets" / "kjv.jsonl.gz"
"""The embedded default corpus: the King James Bible (public domain), one chapter per document."""


@dataclass(frozen=True)
class PreprocessStats:
    documents: int
    tokens: int
    skipped_empty: int
    seconds: float
    tokens_per_s: float
    dtype: str
    prefix: str


def _format_of(path: str) -> str:
    name = path.lower().removesuffix(".gz").removesuffix(".zst").removesuffix(".bz2").removesuffix(".xz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".text")):
        return "text"
    raise ValueError(f"{path}: unknown input format; use .jsonl, .json, .parquet or .txt (optionally .gz).")


def input_format(inputs: list[str], what: str) -> str:
    """The one `datasets` loader name of `inputs` (json, parquet, text), after checking they exist."""
    missing = [p for p in inputs if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    empty = [p for p in inputs if Path(p).stat().st_size == 0]
    if empty:
        raise ValueError(f"input file(s) {', '.join(empty)} are empty (0 bytes); drop them from --input.")
    formats = {_format_of(p) for p in inputs}
    if len(formats) != 1:
        raise ValueError(f"inputs mix formats {sorted(formats)}; {what} each format separately.")
    return formats.pop()


@functools.lru_cache(maxsize=4)
def _tokenizer_cached(path: str):  # one load per worker process
    return load_tokenizer(path)


def _tokenize_batch(batch: dict, *, tokenizer_path: str, text_key: str, append_eod: bool, add_bos: bool) -> dict:
    tok = _tokenizer_cached(tokenizer_path)
    ids = tok.encode_batch([t or "" for t in batch[text_key]])
    prefix = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    suffix = [tok.eos_id] if append_eod else []
    return {"ids": [prefix + x + suffix if x else [] for x in ids]}


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when every id fits (Megatron's choice), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def preprocess(inputs: list[str], tokenizer: str, output_prefix: str, *, text_key: str = "text",
               workers: int = 1, append_eod: bool = True, add_bos: bool = False,
               batch_size: int = 256) -> PreprocessStats:
    """Tokenize `inputs` and write `output_prefix`.bin/.idx/.meta.json; return throughput stats."""
    import warnings

    import datasets
    from tqdm import tqdm

    with warnings.catch_warnings():  # megatron.core warns about absent TE/apex; irrelevant to data
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    fmt = input_format(inputs, "preprocess")
    tok = load_tokenizer(tokenizer)
    tok_path = str(tok.path)
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scaletrain-hf-cache-", dir=out.parent) as cache:
        with malformed_input(list(inputs), text_key):
            ds = datasets.load_dataset(fmt, data_files=list(inputs), split="train", cache_dir=cache)
        if text_key not in ds.column_names:
            raise KeyError(f"inputs have no '{text_key}' field (fields: {', '.join(ds.column_names)}); "
                           "pass --text-key with the field that holds the text.")
        check_text_column(ds.features, list(inputs), text_key)
        ds = ds.map(
            _tokenize_batch, batched=True, batch_size=batch_size, num_proc=workers if workers > 1 else None,
            remove_columns=ds.column_names, desc=f"tokenizing ({workers} worker{'s' if workers > 1 else ''})",
            fn_kwargs={"tokenizer_path": tok_path, "text_key": text_key, "append_eod": append_eod, "add_bos": add_bos},
        )
        dtype = token_dtype(tok.vocab_size)
        tmp_bin, tmp_idx = f"{out}.tmp-{os.getpid()}.bin", f"{out}.tmp-{os.getpid()}.idx"
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        documents = tokens = skipped = max_id = 0
        with tqdm(total=len(ds), desc="writing .bin/.idx", unit="doc", disable=None) as bar:
            for batch in ds.with_format("numpy").iter(batch_size=1024):
                for ids in batch["ids"]:
                    if len(ids) == 0:
                        skipped += 1
                        continue
                    arr = np.asarray(ids, dtype=dtype)
                    builder.add_document(arr, [arr.size])
                    documents += 1
                    tokens += arr.size
                    max_id = max(max_id, int(arr.max()))
                bar.update(len(batch["ids"]))
        builder.finalize(tmp_idx)
    if documents == 0:
        os.unlink(tmp_bin)
        os.unlink(tmp_idx)
        raise ValueError(f"no non-empty documents in {', '.join(inputs)} (field '{text_key}').")
    os.replace(tmp_bin, f"{out}.bin")
    os.replace(tmp_idx, f"{out}.idx")
    seconds = time.perf_counter() - t0
    meta = {
        "tokenizer": tok_path, "tokenizer_sha256": tok.fingerprint(), "tokenizer_vocab_size": tok.vocab_size,
        "eod_id": tok.eos_id, "max_token_id": max_id, "documents": documents, "tokens": tokens,
        "dtype": np.dtype(dtype).name, "append_eod": append_eod, "add_bos": add_bos, "inputs": list(inputs),
    }
    Path(f"{out}.meta.json").write_text(json.dumps(meta, indent=2))
    stats = PreprocessStats(documents, tokens, skipped, seconds, tokens / seconds, np.dtype(dtype).name, str(out))
    return stats


def stats_line(stats: PreprocessStats) -> str:
    d = asdict(stats)
    return (f"wrote {d['prefix']}.bin/.idx: {d['documents']} documents, {d['tokens']:,} tokens ({d['dtype']}), "
            f"{d['skipped_empty']} empty skipped, {d['seconds']:.2f} s, {d['tokens_per_s']:,.0f} tokens/s")
