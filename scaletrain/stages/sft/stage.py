"""SFT as a stage: conversations rendered with the chat template, loss on the assistant turns (or every token),
packed into rows with block-diagonal attention."""

from __future__ import annotations

from typing import Any

import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.chat.tools import bundled_tools
from scaletrain.config.posttrain import ChatConfig, SFTConfig
from scaletrain.stages.pretrain.stage import step_batches
from scaletrain.stages.sft.data import SFTDataset, read_conversations
from scaletrain.stages.sft.objective import SFTObjective
from scaletrain.stages.stage import RunParts, Stage, StageParts
from scaletrain.trainer.loop import LoopState


def render_conversations(parts: RunParts, chat: ChatConfig, sft: SFTConfig
                         ) -> tuple[SFTDataset | None, SFTDataset | None]:
    """Rendered, masked, packed chat datasets (train, valid or None) of the chat rows `chat`, rendered as `sft`
    says; the report goes to the log."""
    tok, seq = parts.tokenizer, parts.cfg.train.seq_length
    renderer = ChatRenderer(tok, chat.template, sft.loss_on, bundled_tools(chat.tools))
    out: list[SFTDataset | None] = []
    for files in (chat.train_data, chat.valid_data):
        if not files:
            out.append(None)
            continue
        ds = SFTDataset(read_conversations(files), renderer, tok, seq, packing=sft.packing, over_length=sft.over_length)
        parts.log(ds.report.line() + f" → {len(ds)} rows of {seq} tokens")
        out.append(ds)
    return out[0], out[1]


class SFTStage(Stage):
    name = "sft"
    help = "supervised fine-tuning on chat data ([posttrain.chat] and [posttrain.sft] sections; = train with posttrain.objective=sft)"
    sections = ("chat", "sft")
    data_rows = "`messages`"

    def render(self, parts: RunParts) -> tuple[Any, Any]:
        s = self.settings(parts.cfg)
        return render_conversations(parts, s.chat, s.sft)

    def build(self, parts: RunParts, model: torch.nn.Module, rendered: tuple[Any, Any], state: LoopState) -> StageParts:
        train, valid = rendered
        objective = SFTObjective(parts.dims.tp_comm, fused_cross_entropy=parts.fused_cross_entropy)
        return StageParts(objective, step_batches(parts, train, state), valid_dataset=valid)
