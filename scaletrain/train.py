"""`python -m scaletrain.train` and `scaletrain.train.main`: the training entry point under its old name.

Launch scripts and the README call it; the command itself lives in scaletrain/commands/train.py.
"""

from __future__ import annotations

from scaletrain.commands.train import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
