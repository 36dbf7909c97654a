"""GRPO prompts: rows → rendered generation prompts, each kept with its row for the reward functions.

A row has `messages` (a conversation; trailing assistant turns — e.g. an SFT file's reference
answer — are dropped, so SFT files serve as prompt files) or `prompt` (a string: one user turn, or a
message list), plus whatever its rewards read (`answer`, `tests`, …). A prompt too long to leave
posttrain.max_new_tokens of room in a training row, or one that cannot be rendered, is counted by
reason and dropped, never truncated (a truncated question has another answer).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from scaletrain.chat.renderer import BadConversation, ChatRenderer, normalise_messages
from scaletrain.stages.sft.data import read_rows


@dataclass
class PromptReport:
    rows: int = 0
    used: int = 0
    dropped: Counter = field(default_factory=Counter)

    def line(self) -> str:
        dropped = ", ".join(f"{n} {r}" for r, n in self.dropped.most_common()) or "none"
        return f"prompts: {self.rows} rows, {self.used} used, dropped: {dropped}"


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


class PromptDataset:
    """prompts[i]: token ids ending in the assistant header; rows[i]: the data row (reward fields)."""

    def __init__(self, rows: list[dict], renderer: ChatRenderer, *, seq_length: int, max_new_tokens: int) -> None:
        self.report = PromptReport(rows=len(rows))
        self.prompts: list[list[int]] = []
        self.rows: list[dict] = []
        limit = seq_length + 1 - max_new_tokens
        for row in rows:
            try:
                ids = renderer.prompt_ids(prompt_messages(row))
            except BadConversation as e:
                self.report.dropped[str(e)] += 1
                continue
            if len(ids) > limit:
                self.report.dropped["longer than train.seq_length + 1 − posttrain.max_new_tokens"] += 1
                continue
            self.prompts.append(ids)
            self.rows.append({k: v for k, v in row.items() if k not in ("messages", "prompt")})
            self.report.used += 1
        if not self.prompts:
            raise ValueError(f"no usable prompts ({self.report.line()})")

    def __len__(self) -> int:
        return len(self.prompts)


class PromptOrder:
    """Which prompt the run's draw-th draw takes: a seeded permutation per epoch over the prompts, so a
    run (and its resumption) visits every prompt once per epoch in a layout-independent order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def __getitem__(self, draw: int) -> int:
        epoch = draw // self.n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.RandomState((self.seed + epoch) % 2**32).permutation(self.n)}
        return int(self._perms[epoch][draw % self.n])


def read_prompt_rows(files: tuple[str, ...] | list[str]) -> list[dict]:
    """Every column of every row (the rewards may read any of them)."""
    return read_rows(files, None)
