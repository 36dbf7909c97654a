"""Distillation as a stage: a student learns a frozen teacher's next-token distributions — on pretraining
documents (data.prefixes), on chat rows (posttrain.train_data, packed as for SFT), or on-policy on its own
completions of prompts (posttrain.distill_on_policy). The teacher is built by the one model-building path
in the student's layout; a student whose model.vocab_size is 0 takes the teacher's (padded) size."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.checkpoint.locate import locate_model
from scaletrain.config.schema import RunConfig
from scaletrain.config.validate import check_choice
from scaletrain.stages.distill.objective import DistillObjective
from scaletrain.stages.distill.on_policy import OnPolicyBatches
from scaletrain.stages.pretrain.stage import NO_PREFIXES, document_datasets, step_batches
from scaletrain.stages.rl.prompts import render_prompts
from scaletrain.stages.sft.stage import SFT_DATA, render_conversations
from scaletrain.stages.stage import ROLLOUT, Companion, RunParts, Stage, StageParts
from scaletrain.trainer.contracts import BatchSource
from scaletrain.trainer.loop import LoopState

TEACHER = "posttrain.teacher"


class DistillStage(Stage):
    name = "distill"
    help = ("knowledge distillation: match posttrain.teacher's next-token distributions (KL, vocab-parallel) on "
            "pretraining data or chat rows (= train with posttrain.objective=distill)")
    fields = (*SFT_DATA, *ROLLOUT, "teacher", "distill_loss", "distill_temperature", "distill_alpha", "distill_top_k",
              "distill_on_policy")

    def reads_documents(self, cfg: RunConfig) -> bool:
        return not self.settings(cfg).train_data

    def rollout_group(self, cfg: RunConfig) -> int:
        return 1 if self.settings(cfg).distill_on_policy else 0

    def companions(self, cfg: RunConfig) -> list[Companion]:
        return [Companion(TEACHER, self.settings(cfg).teacher, "teacher")]

    def derive(self, cfg: RunConfig) -> RunConfig:
        teacher = self.settings(cfg).teacher
        if not teacher or cfg.model.vocab_size:
            return cfg
        # 0 = derive: the teacher's (padded) size, so that both logit tensors shard over tp alike.
        vocab = locate_model(TEACHER, teacher)[2].vocab_size
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))

    def validate(self, cfg: RunConfig) -> list[str]:
        pt, errors = self.settings(cfg), []
        if self.reads_documents(cfg) and not cfg.data.prefixes:
            errors.append(NO_PREFIXES + ", or give posttrain.train_data (chat rows) to distill on.")
        check_choice(errors, "posttrain.distill_loss", pt.distill_loss, ("forward_kl", "reverse_kl"))
        if not pt.teacher:
            errors.append("posttrain.objective = 'distill' needs posttrain.teacher (an HF model directory or a scaletrain "
                          "checkpoint / run directory of a model with the student's tokenizer).")
        if pt.distill_temperature <= 0:
            errors.append(f"posttrain.distill_temperature = {pt.distill_temperature} must be positive.")
        if not 0.0 <= pt.distill_alpha <= 1.0:
            errors.append(f"posttrain.distill_alpha = {pt.distill_alpha} must be within [0, 1] (the KL term's weight; "
                          "1 − α weighs the data's cross-entropy).")
        if pt.distill_top_k < 0:
            errors.append(f"posttrain.distill_top_k = {pt.distill_top_k} must be 0 (the whole distribution) or positive.")
        if pt.distill_on_policy:
            if not pt.train_data:
                errors.append("posttrain.distill_on_policy = true samples completions of prompts: set "
                              "posttrain.train_data (rows with `messages` or `prompt`).")
            if not 1 <= pt.max_new_tokens < cfg.train.seq_length:
                errors.append(f"posttrain.max_new_tokens = {pt.max_new_tokens} must be in [1, train.seq_length = "
                              f"{cfg.train.seq_length}) (the prompt needs room too).")
            if pt.temperature < 0:
                errors.append(f"posttrain.temperature = {pt.temperature} must be 0 (greedy) or positive.")
        if pt.distill_top_k > 0 and pt.distill_loss != "forward_kl":
            errors.append(f"posttrain.distill_top_k = {pt.distill_top_k} with distill_loss = '{pt.distill_loss}': "
                          "reverse KL needs the teacher's probability of every token the student may put mass on; "
                          "use distill_top_k = 0 or distill_loss = 'forward_kl'.")
        return errors

    def render(self, parts: RunParts) -> tuple[Any, Any]:
        """Chat rows: packed SFT rows (train, valid); on-policy, the train rows are prompts the student
        completes and the validation rows stay teacher-forced conversations. Documents: built in `build`."""
        cfg, s = parts.cfg, self.settings(parts.cfg)
        if self.reads_documents(cfg):
            return None, None
        if not s.distill_on_policy:
            return render_conversations(parts, s)
        train, _ = render_prompts(s, parts.tokenizer, cfg.train.seq_length, parts.log, rewards=())
        return train, render_conversations(parts, SimpleNamespace(**{**vars(s), "train_data": ()}))[1]

    def build(self, parts: RunParts, model: torch.nn.Module, rendered: tuple[Any, Any], state: LoopState) -> StageParts:
        cfg, s, dims = parts.cfg, self.settings(parts.cfg), parts.dims
        teacher, line = parts.models.frozen(TEACHER, s.teacher)
        parts.log(f"teacher: {line}; {s.distill_loss} at τ = {s.distill_temperature}, α = {s.distill_alpha}"
                  + (f", its top {s.distill_top_k} tokens per position" if s.distill_top_k else ""))
        objective = DistillObjective(dims.tp_comm, teacher, dims, parts.precision, kind=s.distill_loss,
                                     temperature=s.distill_temperature, alpha=s.distill_alpha, top_k=s.distill_top_k,
                                     vocab_limit=parts.tokenizer.vocab_size,
                                     fused_cross_entropy=parts.fused_cross_entropy)
        train, valid = document_datasets(parts) if self.reads_documents(cfg) else rendered
        batches: BatchSource
        if s.distill_on_policy:
            t, tok = cfg.train, parts.tokenizer
            batches = OnPolicyBatches(
                train, model=model, dims=dims, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
                seq_length=t.seq_length, seed=t.seed, consumed_samples=state.consumed_samples, tokenizer=tok,
                stop_text=ChatRenderer(tok, s.chat_template).end_of_turn(), max_new_tokens=s.max_new_tokens,
                temperature=s.temperature, precision=parts.precision, device=parts.device,
                width_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1,
                rollout_micro_batch=s.rollout_micro_batch or t.micro_batch_size)
        else:
            batches = step_batches(parts, train, state)
        return StageParts(objective, batches, valid_dataset=valid)
