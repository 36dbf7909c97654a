"""Distillation as a stage: a student learns a frozen teacher's next-token distributions — on pretraining
documents (data.prefixes), on chat rows (posttrain.chat.train_data, packed as for SFT), or on-policy on its own
completions of prompts (posttrain.distill.on_policy). The teacher is built by the one model-building path
in the student's layout; a student whose model.vocab_size is 0 takes the teacher's (padded) size."""

from __future__ import annotations

import dataclasses
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
from scaletrain.stages.sft.stage import render_conversations
from scaletrain.stages.stage import Companion, RunParts, Stage, StageParts
from scaletrain.trainer.contracts import BatchSource
from scaletrain.trainer.loop import LoopState

TEACHER = "posttrain.distill.teacher"


class DistillStage(Stage):
    name = "distill"
    help = ("knowledge distillation: match posttrain.distill.teacher's next-token distributions (KL, vocab-parallel) on "
            "pretraining data or chat rows (= train with posttrain.objective=distill)")
    sections = ("chat", "sft", "rollout", "distill")  # chat rows are rendered as SFT's; on-policy, it samples

    def reads_documents(self, cfg: RunConfig) -> bool:
        return not self.settings(cfg).chat.train_data

    def rollout_group(self, cfg: RunConfig) -> int:
        return 1 if self.settings(cfg).distill.on_policy else 0

    def companions(self, cfg: RunConfig) -> list[Companion]:
        return [Companion(TEACHER, self.settings(cfg).distill.teacher, "teacher")]

    def derive(self, cfg: RunConfig) -> RunConfig:
        teacher = self.settings(cfg).distill.teacher
        if not teacher or cfg.model.vocab_size:
            return cfg
        # 0 = derive: the teacher's (padded) size, so that both logit tensors shard over tp alike.
        vocab = locate_model(TEACHER, teacher)[2].vocab_size
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))

    def validate(self, cfg: RunConfig) -> list[str]:
        s, errors = self.settings(cfg), []
        d, ro = s.distill, s.rollout
        if self.reads_documents(cfg) and not cfg.data.prefixes:
            errors.append(NO_PREFIXES + ", or give posttrain.chat.train_data (chat rows) to distill on.")
        check_choice(errors, "posttrain.distill.loss", d.loss, ("forward_kl", "reverse_kl"))
        if not d.teacher:
            errors.append("posttrain.objective = 'distill' needs posttrain.distill.teacher (an HF model directory or a "
                          "scaletrain checkpoint / run directory of a model with the student's tokenizer).")
        if d.temperature <= 0:
            errors.append(f"posttrain.distill.temperature = {d.temperature} must be positive.")
        if not 0.0 <= d.alpha <= 1.0:
            errors.append(f"posttrain.distill.alpha = {d.alpha} must be within [0, 1] (the KL term's weight; "
                          "1 − α weighs the data's cross-entropy).")
        if d.top_k < 0:
            errors.append(f"posttrain.distill.top_k = {d.top_k} must be 0 (the whole distribution) or positive.")
        if d.on_policy:
            if not s.chat.train_data:
                errors.append("posttrain.distill.on_policy = true samples completions of prompts: set "
                              "posttrain.chat.train_data (rows with `messages` or `prompt`).")
            if not 1 <= ro.max_new_tokens < cfg.train.seq_length:
                errors.append(f"posttrain.rollout.max_new_tokens = {ro.max_new_tokens} must be in [1, train.seq_length "
                              f"= {cfg.train.seq_length}) (the prompt needs room too).")
            if ro.temperature < 0:
                errors.append(f"posttrain.rollout.temperature = {ro.temperature} must be 0 (greedy) or positive.")
        if d.top_k > 0 and d.loss != "forward_kl":
            errors.append(f"posttrain.distill.top_k = {d.top_k} with posttrain.distill.loss = '{d.loss}': "
                          "reverse KL needs the teacher's probability of every token the student may put mass on; "
                          "use top_k = 0 or loss = 'forward_kl'.")
        return errors

    def render(self, parts: RunParts) -> tuple[Any, Any]:
        """Chat rows: packed SFT rows (train, valid); on-policy, the train rows are prompts the student
        completes and the validation rows stay teacher-forced conversations. Documents: built in `build`."""
        cfg, s = parts.cfg, self.settings(parts.cfg)
        if self.reads_documents(cfg):
            return None, None
        if not s.distill.on_policy:
            return render_conversations(parts, s.chat, s.sft)
        train, _ = render_prompts(s.chat, s.rollout, parts.tokenizer, cfg.train.seq_length, parts.log, rewards=())
        return train, render_conversations(parts, dataclasses.replace(s.chat, train_data=()), s.sft)[1]

    def build(self, parts: RunParts, model: torch.nn.Module, rendered: tuple[Any, Any], state: LoopState) -> StageParts:
        cfg, s, dims = parts.cfg, self.settings(parts.cfg), parts.dims
        d, ro = s.distill, s.rollout
        teacher, line = parts.models.frozen(TEACHER, d.teacher)
        parts.log(f"teacher: {line}; {d.loss} at τ = {d.temperature}, α = {d.alpha}"
                  + (f", its top {d.top_k} tokens per position" if d.top_k else ""))
        objective = DistillObjective(dims.tp_comm, teacher, dims, parts.precision, kind=d.loss,
                                     temperature=d.temperature, alpha=d.alpha, top_k=d.top_k,
                                     vocab_limit=parts.tokenizer.vocab_size,
                                     fused_cross_entropy=parts.fused_cross_entropy)
        train, valid = document_datasets(parts) if self.reads_documents(cfg) else rendered
        batches: BatchSource
        if d.on_policy:
            t, tok = cfg.train, parts.tokenizer
            batches = OnPolicyBatches(
                train, model=model, dims=dims, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
                seq_length=t.seq_length, seed=t.seed, consumed_samples=state.consumed_samples, tokenizer=tok,
                stop_text=ChatRenderer(tok, s.chat.template).end_of_turn(), max_new_tokens=ro.max_new_tokens,
                temperature=ro.temperature, precision=parts.precision, device=parts.device,
                width_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1,
                rollout_micro_batch=ro.micro_batch or t.micro_batch_size)
        else:
            batches = step_batches(parts, train, state)
        return StageParts(objective, batches, valid_dataset=valid)
