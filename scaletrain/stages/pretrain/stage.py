"""Pretraining as a stage: next-token cross-entropy on the tokenized documents of data.prefixes
(Megatron GPTDataset splits and weighted blends, data/gpt.py), read a step at a time by every dp rank."""

from __future__ import annotations

from typing import Any

import torch

from scaletrain.config.schema import RunConfig
from scaletrain.data.gpt import build_gpt_datasets
from scaletrain.data.loader import StepBatches
from scaletrain.stages.pretrain.objective import LanguageModelingObjective
from scaletrain.stages.stage import RunParts, Stage, StageParts
from scaletrain.trainer.loop import LoopState

NO_PREFIXES = ("data.prefixes is empty: point it at a dataset written by `scaletrain data preprocess` "
               "(the prefix, without .bin/.idx)")


def document_datasets(parts: RunParts) -> tuple[Any, Any]:
    """(train, valid or None) over data.prefixes, sized for the whole run: train.steps global batches and
    eval_iters per validation point."""
    cfg, tok = parts.cfg, parts.tokenizer
    t = cfg.train
    eval_points = (t.steps // t.eval_interval + 1) if t.eval_interval else 0
    return build_gpt_datasets(
        cfg.data, seq_length=t.seq_length, seed=t.seed, eod_id=tok.eos_id, vocab_size=tok.vocab_size,
        train_samples=t.steps * t.global_batch_size, valid_samples=eval_points * t.eval_iters * t.global_batch_size)


def step_batches(parts: RunParts, dataset: Any, state: LoopState) -> StepBatches:
    """This dp rank's microbatches of each step, from `state.consumed_samples` on."""
    t = parts.cfg.train
    return StepBatches(dataset, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
                       dp_rank=parts.dims.dp_rank, dp_size=parts.dims.dp, consumed_samples=state.consumed_samples,
                       num_workers=parts.cfg.data.num_workers)


class PretrainStage(Stage):
    name = "pretrain"
    help = ""  # `scaletrain train` is its command

    def reads_documents(self, cfg: RunConfig) -> bool:
        return True

    def validate(self, cfg: RunConfig) -> list[str]:
        return [] if cfg.data.prefixes else [NO_PREFIXES + "."]

    def build(self, parts: RunParts, model: torch.nn.Module, rendered: tuple[Any, Any], state: LoopState) -> StageParts:
        train, valid = document_datasets(parts)
        objective = LanguageModelingObjective(parts.dims.tp_comm, fused_cross_entropy=parts.fused_cross_entropy)
        return StageParts(objective, step_batches(parts, train, state), valid_dataset=valid)
