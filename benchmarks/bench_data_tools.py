"""Memory and throughput of the data tools on corpora of two sizes: `scaletrain data preprocess` against
the tokenizer's own batch encoding, and `scaletrain data curate` (docs/s, removals).

    python benchmarks/bench_data_tools.py [--copies 8 64] [--workers 2] [--only preprocess|curate]

Corpora: the bundled KJV (1,189 chapters) written `copies` times as jsonl, every copy after the first
with a third of its longer words respelled per copy (so copies are neither exact nor near duplicates:
they flow through every curation stage and fill the dedup index). 8 copies ≈ 35 MB (the size of the
outside comparison's input), 64 ≈ 277 MB. Tokenizer: a byte-level BPE `tokenizer.json` (HF `tokenizers`,
32k vocabulary) trained on the KJV here. Each command runs in its own process under `/usr/bin/time -v`
(peak RSS); throughput is what the command reports (its clock starts after imports). The raw tokenizer
baseline: `tokenizers`' `encode_batch` over the same texts in batches, already in memory, with the same
threads (RAYON_NUM_THREADS), timed alone.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KJV = REPO / "scaletrain" / "data" / "assets" / "kjv.jsonl.gz"


def build_corpus(path: Path, copies: int) -> int:
    """KJV × copies as jsonl (see the module); returns the documents written."""
    rows = [json.loads(line) for line in gzip.open(KJV, "rt")]
    with open(path, "w") as f:
        for c in range(copies):
            for r in rows:
                text = r["text"]
                if c:
                    text = " ".join(w + "abcdefghijklmnopqrstuvwxyz"[(c + zlib.crc32(w.encode())) % 26]
                                    if len(w) > 3 and (zlib.crc32(w.encode()) + c) % 3 == 0 else w
                                    for w in text.split(" "))
                f.write(json.dumps({**r, "text": text, "copy": c}) + "\n")
    return copies * len(rows)


def train_tokenizer(out: Path, vocab: int = 32000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((json.loads(line)["text"] for line in gzip.open(KJV, "rt")), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|end_of_text|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


RAW = """
import json, os, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2])]
tok.encode_batch(texts[:64], add_special_tokens=False)  # the thread pool starts
t0 = time.perf_counter()
n = 0
for i in range(0, len(texts), 1024):
    n += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 1024], add_special_tokens=False))
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t0}))
"""


def measured(cmd: list[str], env: dict) -> tuple[str, float, float]:
    """(stdout, peak RSS MiB, wall seconds) of cmd under /usr/bin/time -v."""
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024
    return out.stdout, rss, wall


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, nargs="+", default=[8, 64])
    p.add_argument("--workers", type=int, default=2, help="tokenizer threads (preprocess --workers)")
    p.add_argument("--only", choices=("preprocess", "curate"), default=None)
    p.add_argument("--code", default=str(REPO), help="the scaletrain checkout to measure (PYTHONPATH)")
    p.add_argument("--work", default=None, help="keep corpora here (default: a temporary folder)")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{args.code}:{args.code}/kernels", "RAYON_NUM_THREADS": str(args.workers),
           "PYTHONWARNINGS": "ignore", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    py = sys.executable
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tok = work / "tok"
        if not (tok / "tokenizer.json").is_file():
            train_tokenizer(tok)
        for copies in args.copies:
            corpus = work / f"kjv_x{copies}.jsonl"
            if not corpus.is_file():
                build_corpus(corpus, copies)
            mb = corpus.stat().st_size / 1e6
            if args.only in (None, "preprocess"):
                raw = json.loads(subprocess.run([py, "-c", RAW, str(tok / "tokenizer.json"), str(corpus)], env=env,
                                                capture_output=True, text=True, check=True).stdout)
                out, rss, wall = measured([py, "-m", "scaletrain.cli", "data", "preprocess", "--input", str(corpus),
                                           "--tokenizer", str(tok), "--output-prefix", str(work / f"x{copies}"),
                                           "--workers", str(args.workers)], env)
                tps = float(re.search(r"([\d,]+) tokens/s", out).group(1).replace(",", ""))
                rows.append(("preprocess", copies, mb, rss, wall, f"{tps:,.0f} tok/s", f"raw tokenizer "
                             f"{raw['tokens'] / raw['seconds']:,.0f} tok/s ({100 * tps / (raw['tokens'] / raw['seconds']):.0f}%)"))
            if args.only in (None, "curate"):
                out, rss, wall = measured([py, "-m", "scaletrain.cli", "data", "curate", "--input", str(corpus),
                                           "--output", str(work / f"x{copies}.curated.jsonl")], env)
                rate = re.search(r"([\d,]+) docs/s", out).group(1)
                kept = re.search(r"kept (\d+ \([\d.]+%\))", out).group(1)
                rows.append(("curate", copies, mb, rss, wall, f"{rate} docs/s", f"kept {kept}"))
    print(f"\nload average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; {args.workers} tokenizer threads; "
          f"code {args.code}")
    print("| command | corpus | MB | peak RSS MiB | wall s | throughput | note |")
    print("|---|---|---|---|---|---|---|")
    for cmd, copies, mb, rss, wall, rate, note in rows:
        print(f"| {cmd} | KJV×{copies} | {mb:.0f} | {rss:.0f} | {wall:.1f} | {rate} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
