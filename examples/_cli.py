"""What the example scripts share: the repository root and running one real `scaletrain` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    """`scaletrain ARGS…` from the repository root, echoed; a failing stage stops the example."""
    print("+ scaletrain", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "scaletrain.cli", *args], cwd=REPO, check=True)


def prepare_arith_task(work: Path, n_eval: int, max_number: int, ops: str) -> tuple[Path, Path]:
    """The synthetic arithmetic task under `work` (skipped where present): data/ (4000 training problems in
    every form, `n_eval` held out), a 384-token tokenizer and the pretraining .bin/.idx. Returns (data, tokenizer)."""
    data, tok = work / "data", work / "tokenizer"
    if not (data / "pretrain.jsonl").exists():
        run("data", "synth", "--output", str(data), "--train", "4000", "--test", str(n_eval),
            "--max-number", str(max_number), "--ops", ops)
    if not (tok / "tokenizer.model").exists():
        run("data", "tokenizer", "--input", str(data / "pretrain.jsonl"), "--vocab-size", "384", "--output", str(tok))
    if not (work / "pretrain_text_document.idx").exists():
        run("data", "preprocess", "--input", str(data / "pretrain.jsonl"), "--tokenizer", str(tok),
            "--output-prefix", str(work / "pretrain_text_document"))
    return data, tok
