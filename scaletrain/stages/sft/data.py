"""SFT data: chat files → rendered, masked, (packed) fixed-length rows, with a report of what was dropped.

Rows are read with Hugging Face `datasets` (jsonl, json or parquet; local files only) and rendered by
chat/renderer.py. Each dataset row becomes one training sample of train.seq_length tokens; with
packing several conversations share a row (block-diagonal attention, positions restarting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaletrain.chat.renderer import BadConversation, ChatRenderer
from scaletrain.chat.rows import RowReport, read_rows
from scaletrain.data.packing import Document, pack
from scaletrain.data.tokenizer import Tokenizer


@dataclass
class SFTReport(RowReport):
    truncated: int = 0
    target_tokens: int = 0

    def line(self) -> str:
        return (f"sft data: {self.rows} conversations, {self.used} used ({self.truncated} truncated), "
                f"dropped: {self.dropped_text()}; {self.target_tokens} target tokens")


def read_conversations(files: tuple[str, ...] | list[str]) -> list:
    """The `messages` of every row."""
    return [row["messages"] for row in read_rows(files, ("messages",))]


class SFTDataset(torch.utils.data.Dataset):
    """Fixed-length rows: tokens, labels, loss_mask, position_ids, document_ids (all [seq_length])."""

    def __init__(self, conversations: list, renderer: ChatRenderer, tokenizer: Tokenizer, seq_length: int, *,
                 packing: bool = True, over_length: str = "drop") -> None:
        self.report = SFTReport(rows=len(conversations))
        docs: list[Document] = []
        for messages in conversations:
            try:
                ids, target = renderer.render(messages)
            except BadConversation as e:
                self.report.dropped[str(e)] += 1
                continue
            ids, target = renderer.close(ids, target)  # end of document (eos, never twice: chat.py)
            if len(ids) > seq_length + 1:
                if over_length == "drop":
                    self.report.dropped["longer than train.seq_length"] += 1
                    continue
                ids, target = ids[:seq_length + 1], target[:seq_length + 1]
                self.report.truncated += 1
            if sum(target[1:]) == 0:
                self.report.dropped["no target tokens left"] += 1
                continue
            # loss_mask[i] = 1 when the label of position i (token i+1) is a target.
            docs.append(Document(ids, target[1:] + [0]))
            self.report.used += 1
            self.report.target_tokens += sum(target[1:])
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        if packing:
            self.rows = pack(docs, seq_length, pad)
        else:
            self.rows = [r for d in docs for r in pack([d], seq_length, pad)]
        if not self.rows:
            raise ValueError(f"no usable conversations ({self.report.line()})")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]
