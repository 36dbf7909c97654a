"""`scaletrain data preprocess`: text corpora → Megatron .bin/.idx, as a stream.

Rows are read a row at a time (data/rows.py: jsonl / json / parquet / text, gzip welcome; every format
reads as HF `datasets` read it before), tokenised in batches by the tokenizer's
own threaded batch encoder (`--workers` threads; HF `tokenizers` and SentencePiece both release the GIL),
and written as they come (data/indexed_builder.py: the bytes megatron.core's IndexedDatasetBuilder
writes, without importing it). Memory holds a batch of rows and 4 bytes per document, whatever the
corpus size; nothing is cached on disk. A `PREFIX.meta.json` sidecar records which tokenizer wrote the
data, so a vocabulary mismatch is caught before training. Outputs appear atomically (temporary names,
then rename; removed on failure), so an interrupted run never leaves a half-written dataset under the
final name.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scaletrain.data.indexed_builder import IndexedBuilder
from scaletrain.data.inputs import checked_rows
from scaletrain.data.rows import iter_rows, text_batches
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


def _tokenize_batch(texts: list, tok, *, append_eod: bool, add_bos: bool) -> list[list[int]]:
    """Each text's ids with BOS / EOD added; [] for a text with no tokens (skipped, not a document)."""
    ids = tok.encode_batch([t or "" for t in texts])
    prefix = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    suffix = [tok.eos_id] if append_eod else []
    return [prefix + x + suffix if x else [] for x in ids]


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when every id fits (Megatron's choice), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def preprocess(inputs: list[str], tokenizer: str, output_prefix: str, *, text_key: str = "text",
               workers: int | None = None, append_eod: bool = True, add_bos: bool = False,
               batch_size: int = 256) -> PreprocessStats:
    """Tokenize `inputs` and write `output_prefix`.bin/.idx/.meta.json; return throughput stats.

    workers: tokenizer threads (None: every core). HF `tokenizers` sizes its thread pool once per process,
    from RAYON_NUM_THREADS at its first batch: set here, so it holds for the first call in a process."""
    from tqdm import tqdm  # a progress bar (optional feel, slow import)

    fmt = input_format(inputs, "preprocess")
    threads = workers or os.cpu_count() or 1
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    tok = load_tokenizer(tokenizer)
    tok.threads = threads
    tok_path = str(tok.path)
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = checked_rows(iter_rows(list(inputs), fmt), list(inputs), text_key)  # non-string text: named
    dtype = token_dtype(tok.vocab_size)
    tmp_bin, tmp_idx = f"{out}.tmp-{os.getpid()}.bin", f"{out}.tmp-{os.getpid()}.idx"
    builder = IndexedBuilder(tmp_bin, dtype)
    skipped = 0
    try:
        with tqdm(desc=f"tokenizing ({threads} thread{'s' if threads > 1 else ''})", unit="doc", disable=None) as bar:
            for texts in text_batches(rows, text_key, batch_size):
                docs = _tokenize_batch(texts, tok, append_eod=append_eod, add_bos=add_bos)
                kept = [d for d in docs if d]
                skipped += len(docs) - len(kept)
                builder.add_documents(kept)
                bar.update(len(docs))
        builder.finalize(tmp_idx)
        if builder.documents == 0:
            raise ValueError(f"no non-empty documents in {', '.join(inputs)} (field '{text_key}').")
    except BaseException:
        builder.close()
        for tmp in (tmp_bin, tmp_idx):
            Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp_bin, f"{out}.bin")
    os.replace(tmp_idx, f"{out}.idx")
    seconds = time.perf_counter() - t0
    documents, tokens = builder.documents, builder.tokens
    meta = {
        "tokenizer": tok_path, "tokenizer_sha256": tok.fingerprint(), "tokenizer_vocab_size": tok.vocab_size,
        "eod_id": tok.eos_id, "max_token_id": builder.max_id, "documents": documents, "tokens": tokens,
        "dtype": np.dtype(dtype).name, "append_eod": append_eod, "add_bos": add_bos, "inputs": list(inputs),
    }
    Path(f"{out}.meta.json").write_text(json.dumps(meta, indent=2))
    stats = PreprocessStats(documents, tokens, skipped, seconds, tokens / seconds, np.dtype(dtype).name, str(out))
    return stats


def stats_line(stats: PreprocessStats) -> str:
    d = asdict(stats)
    return (f"wrote {d['prefix']}.bin/.idx: {d['documents']} documents, {d['tokens']:,} tokens ({d['dtype']}), "
            f"{d['skipped_empty']} empty skipped, {d['seconds']:.2f} s, {d['tokens_per_s']:,.0f} tokens/s")
