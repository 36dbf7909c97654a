"""Preference stages on prompt / chosen / rejected rows: the DPO family (`dpo`) and reward models (`reward`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.chat.tools import bundled_tools
from scaletrain.config.posttrain import ChatConfig
from scaletrain.config.schema import RunConfig
from scaletrain.stages.preference.data import PreferenceDataset, read_pairs
from scaletrain.stages.preference.dpo import DPOObjective
from scaletrain.stages.preference.reference import ReferenceLogProbs
from scaletrain.stages.preference.reward_model import RewardObjective
from scaletrain.stages.pretrain.stage import step_batches
from scaletrain.stages.stage import RunParts, Stage, StageParts
from scaletrain.trainer.contracts import Phase
from scaletrain.trainer.loop import LoopState

PAIRS = "prompt, chosen, rejected"


def render_pairs(parts: RunParts, chat: ChatConfig, *, always_eos: bool
                 ) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """Padded preference-pair datasets (train, valid or None) of the chat rows `chat`, with globally unique pair
    indices."""
    tok, seq = parts.tokenizer, parts.cfg.train.seq_length
    renderer = ChatRenderer(tok, chat.template, "assistant", bundled_tools(chat.tools))
    train = PreferenceDataset(read_pairs(chat.train_data), renderer, tok, seq, always_eos=always_eos)
    parts.log(train.report.line())
    valid = None
    if chat.valid_data:
        valid = PreferenceDataset(read_pairs(chat.valid_data), renderer, tok, seq, index_offset=len(train),
                                  always_eos=always_eos)
        parts.log("validation " + valid.report.line())
    return train, valid


class DPOStage(Stage):
    name = "dpo"
    help = ("preference optimisation (DPO, IPO, hinge, SimPO) on prompt/chosen/rejected rows ([posttrain.dpo] section; "
            "= train with posttrain.objective=dpo)")
    sections = ("chat", "dpo")
    data_rows = PAIRS

    def render(self, parts: RunParts) -> tuple[Any, Any]:
        return render_pairs(parts, self.settings(parts.cfg).chat, always_eos=False)

    def build(self, parts: RunParts, model: torch.nn.Module, rendered: tuple[Any, Any], state: LoopState) -> StageParts:
        s, dims = self.settings(parts.cfg).dpo, parts.dims
        objective = DPOObjective(dims.tp_comm, s.loss_type, s.beta, s.label_smoothing, s.simpo_gamma,
                                 fused_cross_entropy=parts.fused_cross_entropy, nll_weight=s.nll_weight,
                                 cp=dims.comm("cp"))
        phases: tuple[Phase, ...] = ()
        if objective.needs_reference:  # the starting policy's log-probs, once, before the first step
            phases = (ReferenceLogProbs(objective, model, list(rendered), micro_batch=parts.cfg.train.micro_batch_size,
                                        run_dir=parts.run_dir, dims=dims, precision=parts.precision,
                                        device=parts.device, resumed=parts.resumed, log=parts.log),)
        return StageParts(objective, step_batches(parts, rendered[0], state), phases, valid_dataset=rendered[1])


class RewardModelStage(Stage):
    name = "reward"
    help = ("train a reward model (Bradley–Terry, score head) on prompt/chosen/rejected rows ([posttrain.reward] section; "
            "= train with posttrain.objective=reward)")
    sections = ("chat", "reward")
    score_head = True
    data_rows = PAIRS

    def derive(self, cfg: RunConfig) -> RunConfig:
        if cfg.model.num_labels:
            return cfg
        # 0 = derive: one score per conversation
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_labels=1))

    def render(self, parts: RunParts) -> tuple[Any, Any]:
        return render_pairs(parts, self.settings(parts.cfg).chat, always_eos=True)

    def build(self, parts: RunParts, model: torch.nn.Module, rendered: tuple[Any, Any], state: LoopState) -> StageParts:
        s = self.settings(parts.cfg).reward
        objective = RewardObjective(margin=s.margin, center=s.center_coefficient, cp=parts.dims.comm("cp"))
        return StageParts(objective, step_batches(parts, rendered[0], state), valid_dataset=rendered[1])
