"""Preference data: (prompt, chosen, rejected) rows → padded token rows with response masks.

`prompt` is a string (one user turn) or a message list; `chosen` / `rejected` are strings (one
assistant turn) or message lists (the turns that follow the prompt). Both responses are rendered
after the same prompt with the chat renderer, so the mask covers exactly the response tokens. Bad
rows (empty responses, identical responses, over-length) are counted by reason.
"""

from __future__ import annotations

import torch

from scaletrain.chat.renderer import BadConversation, ChatRenderer
from scaletrain.chat.rows import RowReport, pair_messages, read_rows
from scaletrain.data.tokenizer import Tokenizer

SIDES = ("chosen", "rejected")


class DPOReport(RowReport):
    def line(self) -> str:
        return f"preference data: {self.rows} pairs, {self.used} used, dropped: {self.dropped_text()}"


def read_pairs(files: tuple[str, ...] | list[str]) -> list[dict]:
    """prompt, chosen and rejected of every row."""
    return read_rows(files, ("prompt", "chosen", "rejected"))


class PreferenceDataset(torch.utils.data.Dataset):
    """Item i: {chosen,rejected}_{tokens,labels,mask} [seq_length] and `index` (for reference log-probs).
    always_eos (reward models): eos follows every conversation, even after an eos end-of-turn marker — the
    score is read at the last rendered token, before it, where transformers pools (the last non-pad token)."""

    def __init__(self, pairs: list[dict], renderer: ChatRenderer, tokenizer: Tokenizer, seq_length: int,
                 index_offset: int = 0, always_eos: bool = False) -> None:
        self.report = DPOReport(rows=len(pairs))
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.items: list[dict[str, torch.Tensor]] = []
        for pair in pairs:
            try:
                if pair["chosen"] == pair["rejected"]:
                    raise BadConversation("identical responses")
                item: dict[str, torch.Tensor] = {}
                for side in SIDES:
                    ids, target = renderer.render(pair_messages(pair["prompt"], pair[side]))
                    ids, target = (ids + [tokenizer.eos_id], target + [target[-1]]) if always_eos else \
                        renderer.close(ids, target)  # + eos, never twice (chat.py)
                    if len(ids) > seq_length + 1:
                        raise BadConversation("longer than train.seq_length")
                    n = len(ids)
                    t = torch.tensor(ids + [pad] * (seq_length + 1 - n))
                    mask = torch.tensor(target[1:] + [0] * (seq_length + 1 - n))
                    item[f"{side}_tokens"], item[f"{side}_labels"], item[f"{side}_mask"] = t[:-1], t[1:], mask
            except BadConversation as e:
                self.report.dropped[str(e)] += 1
                continue
            item["index"] = torch.tensor(index_offset + len(self.items))  # unique across train and valid
            self.items.append(item)
        self.report.used = len(self.items)
        if not self.items:
            raise ValueError(f"no usable preference pairs ({self.report.line()})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]
