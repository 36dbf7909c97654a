"""Memory and throughput of the data tools on corpora of two sizes: `scaletrain data preprocess` against
the tokenizer's own batch encoding, and `scaletrain data curate` (docs/s, removals).

    python benchmarks/bench_data_tools.py [--copies 1 8] [--workers 2] [--only preprocess|curate]
        [--baseline-code DIR]   # also run another checkout's commands, interleaved (before/after)

Corpora: the bundled KJV (1,189 chapters, 4.3 MB) written `copies` times as jsonl, every copy after the
first with a third of its longer words respelled per copy (so copies are neither exact nor near
duplicates: they flow through every curation stage and fill the dedup index). 8 copies ≈ 35 MB, the size
of the outside comparison's input. Tokenizer: a byte-level BPE `tokenizer.json` (HF `tokenizers`,
32k vocabulary) trained on the KJV here. Each command runs in its own process under `/usr/bin/time -v`
(peak RSS); throughput is what the command reports (its clock starts after imports). The raw tokenizer
baseline: `tokenizers`' `encode_batch` and `encode_batch_fast` (the faster counts) over the same texts in
batches of 1024, already in memory, with the same threads (RAYON_NUM_THREADS), timed alone, right before each preprocess run: the ratio is taken per
round, then its median. Every measurement runs `--rounds` times, interleaved with the others (the
machine may be shared); medians.
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
encode = getattr(tok, sys.argv[3])
encode(texts[:64], add_special_tokens=False)  # the thread pool starts
t0 = time.perf_counter()
n = 0
for i in range(0, len(texts), 1024):
    n += sum(len(e.ids) for e in encode(texts[i:i + 1024], add_special_tokens=False))
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t0}))
"""


def measured(cmd: list[str], env: dict) -> tuple[str, float, float]:
    """(stdout, peak RSS MiB, wall seconds) of cmd under /usr/bin/time -v, run from the measured checkout
    (`python -m` puts the working directory first on the path)."""
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env,
                         cwd=env["PYTHONPATH"].split(":")[0])
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024
    return out.stdout, rss, wall


def main() -> int:
    import statistics

    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, nargs="+", default=[1, 8])
    p.add_argument("--workers", type=int, default=2, help="tokenizer threads (preprocess --workers)")
    p.add_argument("--only", choices=("preprocess", "curate"), default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--code", default=str(REPO), help="the scaletrain checkout to measure (PYTHONPATH)")
    p.add_argument("--baseline-code", default=None, help="another checkout, measured interleaved with --code")
    p.add_argument("--work", default=None, help="keep corpora here (default: a temporary folder)")
    args = p.parse_args()

    def env_for(code: str) -> dict:
        return {**os.environ, "PYTHONPATH": f"{code}:{code}/kernels", "RAYON_NUM_THREADS": str(args.workers),
                "PYTHONWARNINGS": "ignore", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}

    codes = {"this": args.code, **({"baseline": args.baseline_code} if args.baseline_code else {})}
    py = sys.executable
    load_before = os.getloadavg()[0]
    results: dict[tuple, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tok = work / "tok"
        if not (tok / "tokenizer.json").is_file():
            train_tokenizer(tok)
        corpora = {}
        for copies in args.copies:
            corpora[copies] = work / f"kjv_x{copies}.jsonl"
            if not corpora[copies].is_file():
                build_corpus(corpora[copies], copies)
        for _ in range(args.rounds):
            for copies, corpus in corpora.items():
                if args.only in (None, "preprocess"):
                    for fn in ("encode_batch", "encode_batch_fast"):
                        raw = json.loads(subprocess.run([py, "-c", RAW, str(tok / "tokenizer.json"), str(corpus), fn],
                                                        env=env_for(args.code), capture_output=True, text=True,
                                                        check=True).stdout)
                        results.setdefault(("raw " + fn, copies), []).append(raw["tokens"] / raw["seconds"])
                    for name, code in codes.items():
                        out, rss, wall = measured([py, "-m", "scaletrain.cli", "data", "preprocess", "--input",
                                                   str(corpus), "--tokenizer", str(tok), "--output-prefix",
                                                   str(work / f"x{copies}_{name}"), "--workers", str(args.workers)],
                                                  env_for(code))
                        tps = float(re.search(r"([\d,]+) tokens/s", out).group(1).replace(",", ""))
                        raw = max(results[("raw " + fn, copies)][-1] for fn in ("encode_batch", "encode_batch_fast"))
                        results.setdefault(("preprocess", name, copies), []).append((rss, wall, tps, tps / raw))
                if args.only in (None, "curate"):
                    for name, code in codes.items():
                        out, rss, wall = measured([py, "-m", "scaletrain.cli", "data", "curate", "--input", str(corpus),
                                                   "--output", str(work / f"x{copies}_{name}.curated.jsonl")],
                                                  env_for(code))
                        rate = float(re.search(r"([\d,]+) docs/s", out).group(1).replace(",", ""))
                        kept = re.search(r"kept (\d+ \([\d.]+%\))", out).group(1)
                        results.setdefault(("curate", name, copies), []).append((rss, wall, rate, kept))
    med = statistics.median
    print(f"\nload average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; {args.workers} tokenizer threads; "
          f"{args.rounds} interleaved rounds, medians; this = {args.code}"
          + (f", baseline = {args.baseline_code}" if args.baseline_code else ""))
    print("| command | code | corpus | MB | peak RSS MiB | wall s | throughput | note |")
    print("|---|---|---|---|---|---|---|---|")
    for key, vals in results.items():
        if key[0] == "preprocess":
            _, name, copies = key
            raw = max(med(results[("raw encode_batch", copies)]), med(results[("raw encode_batch_fast", copies)]))
            tps = med(v[2] for v in vals)
            print(f"| preprocess | {name} | KJV×{copies} | {corpora[copies].stat().st_size / 1e6:.0f} | "
                  f"{med(v[0] for v in vals):.0f} | {med(v[1] for v in vals):.1f} | {tps:,.0f} tok/s | "
                  f"{100 * med(v[3] for v in vals):.0f}% of the raw tokenizer run just before it (medians: raw "
                  f"{raw:,.0f} tok/s; encode_batch {med(results[('raw encode_batch', copies)]):,.0f}) |")
        elif key[0] == "curate":
            _, name, copies = key
            print(f"| curate | {name} | KJV×{copies} | {corpora[copies].stat().st_size / 1e6:.0f} | "
                  f"{med(v[0] for v in vals):.0f} | {med(v[1] for v in vals):.1f} | {med(v[2] for v in vals):,.0f} "
                  f"docs/s | kept {vals[0][3]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
