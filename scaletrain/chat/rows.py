"""Chat data rows: local jsonl / json / parquet files read through HF datasets, the prompt a row asks a model
to continue, and one side of a preference pair as a conversation."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from scaletrain.chat.renderer import BadConversation, normalise_messages


@dataclass
class RowReport:
    """What a stage made of its data rows, printed once at start: rows read, used, and dropped by reason."""

    rows: int = 0
    used: int = 0
    dropped: Counter = field(default_factory=Counter)

    def dropped_text(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common()) or "none"


def read_rows(files: tuple[str, ...] | list[str], columns: tuple[str, ...] | None) -> list[dict]:
    """The `columns` (None: all) of every row of local jsonl/json/parquet files, in file order (HF datasets)."""
    from datasets import load_dataset  # heavy (pyarrow, pandas): imported when chat rows are read
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # the run's own log reports what was read
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"posttrain data file(s) not found: {', '.join(missing)}")
    kind = "parquet" if all(str(f).endswith(".parquet") for f in files) else "json"
    ds = load_dataset(kind, data_files=list(files), split="train")
    need = set(columns or ()) - set(ds.column_names)
    if need:
        raise ValueError(f"{files[0]}: rows need {', '.join(sorted(need))} (columns: {', '.join(ds.column_names)})")
    if columns is None:
        return list(ds)
    return [{c: row[c] for c in columns} for row in ds.select_columns(list(columns))]


def prompt_messages(row: dict) -> list[dict]:
    """The conversation to continue: `messages` without trailing assistant turns, or `prompt`."""
    if row.get("messages") is not None:
        messages = normalise_messages(row["messages"])
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
    elif row.get("prompt") is not None:
        p = row["prompt"]
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else normalise_messages(p)
    else:
        raise BadConversation("neither `messages` nor `prompt`")
    if not messages:
        raise BadConversation("no prompt turns")
    if messages[-1].get("role") not in ("user", "tool"):
        raise BadConversation(f"the prompt ends with a {messages[-1].get('role')} turn, not user or tool")
    return messages


def pair_messages(prompt, response) -> list[dict]:
    """One side of a preference pair as a conversation: the prompt (a string: one user turn), then the response."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    resp = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    return msgs + resp
