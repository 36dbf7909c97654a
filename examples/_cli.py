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
