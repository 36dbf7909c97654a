"""Cost of the integrity checks: the .bin scan for out-of-vocabulary ids and checkpoint checksums.

    python benchmarks/bench_integrity.py [--synthetic-gb 1.0] [--ckpt-mb 100]

1. `max_token_id` (data/indexed.py): a vectorised max over the memory-mapped .bin, on the bundled
   corpus preprocessed with a 2,048-token tokenizer and on a synthetic uint16 .bin of the given size,
   with the page cache warm (the file was just written) — the first start after preprocessing. Later
   starts read the cached result (PREFIX/cache/), timed too.
2. Checkpoint checksums (checkpoint/checksums.py): save and load of a tiny model and of a model whose
   checkpoint (weights + AdamW moments, float32) is about `--ckpt-mb` MB; the manifest's hashing at
   save and the verification at load are timed on their own, beside the whole save and load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from scaletrain.checkpoint.checksums import verify_checkpoint, write_manifest  # noqa: E402
from scaletrain.config.schema import ModelConfig  # noqa: E402
from scaletrain.config.validate import resolve_model  # noqa: E402
from scaletrain.data.indexed import check_indexed_dataset, max_token_id  # noqa: E402
from scaletrain.distributed import ParallelDims  # noqa: E402


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def scan(prefix: str) -> dict:
    info = check_indexed_dataset(prefix)
    cache = Path(prefix) / "cache" / "scaletrain_max_token_id.json"

    def cold() -> None:
        cache.unlink(missing_ok=True)
        max_token_id(info)

    t_scan = _timed(cold)
    t_cached = _timed(lambda: max_token_id(info))
    gb = info.tokens * np.dtype(info.dtype).itemsize / 1e9
    return {"prefix": prefix, "tokens": info.tokens, "GB": round(gb, 3), "scan_s": round(t_scan, 4),
            "GB_per_s": round(gb / t_scan, 2), "cached_s": round(t_cached, 5)}


def synthetic_dataset(folder: Path, gb: float) -> str:
    """A uint16 .bin of `gb` GB (sequences of 2,048 random ids), written by megatron.core's builder."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = folder / "synthetic"
    tokens, doc = int(gb * 1e9 / 2), 2048
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    block = rng.integers(0, 32000, size=(1024, doc), dtype=np.uint16)
    for start in range(0, tokens // doc, 1024):  # 1,024 sequences of 2,048 tokens per document
        n = min(1024, tokens // doc - start)
        builder.add_document(block[:n].ravel(), [doc] * n)
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _model(hidden: int, layers: int, vocab: int):
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters

    cfg = resolve_model(ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=4,
                                    ffn_hidden_size=4 * hidden), tokenizer_vocab=None, tp=1, seq_length=64)
    model = build_model(cfg)
    init_parameters(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, vocab, (1, 16))).sum().backward()
    opt.step()
    return model, opt


def checkpoint(name: str, hidden: int, layers: int, vocab: int, folder: Path) -> dict:
    model, opt = _model(hidden, layers, vocab)
    root = folder / name
    t_save = _timed(lambda: save_checkpoint(root, 1, model, opt, {"consumed_samples": 0}, dims=ParallelDims.single()), repeat=2)
    path = root / "step_0000001"
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    t_hash = _timed(lambda: write_manifest(path))
    t_verify = _timed(lambda: verify_checkpoint(path))
    t_load = _timed(lambda: load_checkpoint(path, model, opt, dims=ParallelDims.single()))
    return {"checkpoint": name, "MB": round(size / 1e6, 1), "save_s": round(t_save, 3),
            "hash_at_save_s": round(t_hash, 4), "load_s": round(t_load, 3), "verify_at_load_s": round(t_verify, 4),
            "verify_GB_per_s": round(size / 1e9 / t_verify, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-gb", type=float, default=1.0)
    parser.add_argument("--ckpt-mb", type=float, default=100.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        folder = Path(tmp)
        import gzip

        from scaletrain.data.preprocess import BUILTIN_CORPUS, preprocess
        from scaletrain.data.tokenizer import train_sentencepiece

        with gzip.open(BUILTIN_CORPUS, "rt") as f:
            texts = [json.loads(line)["text"] for line in f]
        train_sentencepiece(texts, folder / "tok", 2048)
        preprocess([str(BUILTIN_CORPUS)], str(folder / "tok"), str(folder / "kjv"))
        rows = [scan(str(folder / "kjv")), scan(synthetic_dataset(folder, args.synthetic_gb))]
        # ~12·h² parameters per layer; weights + two AdamW moments in float32 = 12 bytes per parameter
        hidden = 512
        layers = max(1, round(args.ckpt_mb * 1e6 / 12 / (12 * hidden * hidden + 2 * 2048 * hidden / 4)))
        rows += [checkpoint("tiny", 32, 1, 64, folder), checkpoint(f"~{args.ckpt_mb:g}MB", hidden, layers, 2048, folder)]
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
