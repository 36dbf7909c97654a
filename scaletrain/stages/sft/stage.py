"""SFT as a stage: conversations rendered with the chat template, loss on the assistant turns (or every token),
packed into rows with block-diagonal attention."""

from __future__ import annotations

from typing import Any

import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.chat.tools import bundled_tools
from scaletrain.stages.pretrain.stage import step_batches
from scaletrain.stages.sft.data import SFTDataset, read_conversations
from scaletrain.stages.sft.objective import SFTObjective
from scaletrain.stages.stage import CHAT_DATA, RunParts, Stage, StageParts
from scaletrain.trainer.loop import LoopState

SFT_DATA = (*CHAT_DATA, "loss_on", "packing", "over_length")


def render_conversations(parts: RunParts, s: Any) -> tuple[SFTDataset | None, SFTDataset | None]:
    """Rendered, masked, packed chat datasets (train, valid or None) from settings `s` (SFT_DATA); the
    report goes to the log."""
    tok, seq = parts.tokenizer, parts.cfg.train.seq_length
    renderer = ChatRenderer(tok, s.chat_template, s.loss_on, bundled_tools(s.tools))
    out: list[SFTDataset | None] = []
    for files in (s.train_data, s.valid_data):
        if not files:
            out.append(None)
            continue
        ds = SFTDataset(read_conversations(files), renderer, tok, seq, packing=s.packing, over_length=s.over_length)
        parts.log(ds.report.line() + f" → {len(ds)} rows of {seq} tokens")
        out.append(ds)
    return out[0], out[1]


class SFTStage(Stage):
    name = "sft"
    help = "supervised fine-tuning on chat data ([posttrain] section; = train with posttrain.objective=sft)"
    fields = SFT_DATA
    data_rows = "`messages`"

    def render(self, parts: RunParts) -> tuple[Any, Any]:
        return render_conversations(parts, self.settings(parts.cfg))

    def build(self, parts: RunParts, model: torch.nn.Module, rendered: tuple[Any, Any], state: LoopState) -> StageParts:
        train, valid = rendered
        objective = SFTObjective(parts.dims.tp_comm, fused_cross_entropy=parts.fused_cross_entropy)
        return StageParts(objective, step_batches(parts, train, state), valid_dataset=valid)
