"""GRPO prompts: rows → rendered generation prompts, each kept with its row for the reward functions.

A row has `messages` (a conversation; trailing assistant turns — e.g. an SFT file's reference
answer — are dropped, so SFT files serve as prompt files) or `prompt` (a string: one user turn, or a
message list), plus whatever its rewards read (`answer`, `tests`, …). A prompt too long to leave
posttrain.rollout.max_new_tokens of room in a training row, or one that cannot be rendered, is counted by
reason and dropped, never truncated (a truncated question has another answer).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from scaletrain.chat.renderer import BadConversation, ChatRenderer
from scaletrain.chat.rows import RowReport, prompt_messages, read_rows
from scaletrain.chat.tools import bundled_tools
from scaletrain.config.load import ConfigError
from scaletrain.config.posttrain import ChatConfig, RolloutConfig
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.stages.rl.rewards import required_fields


class PromptReport(RowReport):
    def line(self) -> str:
        return f"prompts: {self.rows} rows, {self.used} used, dropped: {self.dropped_text()}"


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
                self.report.dropped["longer than train.seq_length + 1 − posttrain.rollout.max_new_tokens"] += 1
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


def render_prompts(chat: ChatConfig, rollout: RolloutConfig, tokenizer: Tokenizer, seq_length: int,
                   log: Callable[[str], None], rewards: tuple[str, ...]
                   ) -> tuple[PromptDataset | None, PromptDataset | None]:
    """Prompt datasets (train, valid or None) of the chat rows `chat`, with room for `rollout.max_new_tokens`:
    rendered generation prompts with their rows, checked for the fields `rewards` read before any parameter
    exists."""
    renderer = ChatRenderer(tokenizer, chat.template, "assistant", bundled_tools(chat.tools))
    out: list[PromptDataset | None] = []
    for files in (chat.train_data, chat.valid_data):
        if not files:
            out.append(None)
            continue
        ds = PromptDataset(read_prompt_rows(files), renderer, seq_length=seq_length,
                           max_new_tokens=rollout.max_new_tokens)
        for name in rewards:
            for key in required_fields(name):
                missing = sum(1 for row in ds.rows if row.get(key) is None)
                if missing:
                    raise ConfigError(f"posttrain.rewards.functions: '{name}' reads the `{key}` field, which "
                                      f"{missing} of {len(ds.rows)} prompt rows of {', '.join(files)} lack.")
        log(("validation " if out else "") + ds.report.line())
        out.append(ds)
    return out[0], out[1]
