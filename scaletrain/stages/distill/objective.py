"""Knowledge distillation: a student learns a frozen teacher's next-token distributions.

Per loss token (Hinton et al.; the student and teacher share the tokenizer):

    loss = α · τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))  +  (1 − α) · CE(z_S, label)

(τ² keeps the gradient's scale independent of τ; α = 1 is pure distillation). 'reverse_kl' swaps the
KL's arguments (mode-seeking, as MiniLLM argues for generative students); `top_k > 0` keeps only the
teacher's k most likely tokens per position and the mass left over (sparse distillation: k values
per token to hold instead of the vocabulary; the KL over those k + 1 outcomes). The divergence is
vocab-parallel (nn/kl.py): nothing gathers the vocabulary.

The teacher is any causal LM of the student's vocabulary — usually larger — built in the student's
own layout (tp, pp, SP; cp) and frozen. Without pipeline parallelism each microbatch's teacher
forward runs right before the student's (in `forward_step`), so one microbatch's teacher logits
exist at a time. Pipelined, the teacher's stages cannot interleave with the student's schedule, so
each step, once the microbatches are on the device (trainer/step.prepare_batches), `annotate` runs
the teacher forward-only through the layout's schedule over the step's microbatches and its last
stage stores the teacher's logits (dense [b, s, V/tp], compute dtype) or top-k ids and log-probs at τ
([b, s, k]) in each microbatch, where the student's loss (also on the last stage) reads them — one
dense logit tensor per microbatch of the step; top-k bounds it to k ids and log-probs per token. Data: pretraining
documents (data.prefixes) or chat rows (posttrain.chat.train_data, rendered and packed as for SFT, the
loss on posttrain.sft.loss_on tokens).
"""

from __future__ import annotations

import torch

from scaletrain.data.packing import model_inputs
from scaletrain.distributed.comm import Comm
from scaletrain.distributed.dims import ParallelDims
from scaletrain.nn import cross_entropy_per_token
from scaletrain.nn.kl import kl_per_token, teacher_top_k
from scaletrain.trainer.contracts import Objective
from scaletrain.trainer.precision import Precision
from scaletrain.trainer.step import forward_pass

METRICS = ("kd", "ce")  # means per loss token: the (unscaled) KL at temperature τ, the hard-label cross-entropy


class DistillObjective(Objective):
    name = "distill"
    metrics = METRICS

    def __init__(self, tp: Comm | None, teacher: torch.nn.Module, dims: ParallelDims, precision: Precision, *, kind: str = "forward_kl",
                 temperature: float = 1.0, alpha: float = 1.0, top_k: int = 0, vocab_limit: int | None = None,
                 fused_cross_entropy: bool = False) -> None:
        self.tp, self.teacher, self.dims, self.precision = tp, teacher, dims, precision
        self.kind, self.temperature, self.alpha, self.top_k = kind, temperature, alpha, top_k
        self.vocab_limit, self.fused = vocab_limit, fused_cross_entropy

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["loss_mask"].sum()

    @property
    def pipelined(self) -> bool:
        """Whether the teacher is split into pipeline stages: then its outputs for the step are computed up
        front (`annotate`); otherwise each microbatch's teacher forward runs just before the student's
        (`forward_step`), so only one microbatch's teacher logits ever exist."""
        return self.dims.pp > 1

    def _record(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> None:
        if self.top_k:
            batch["teacher_ids"], batch["teacher_logps"] = teacher_top_k(
                output, self.top_k, self.tp, temperature=self.temperature, vocab_limit=self.vocab_limit)
        else:
            batch["teacher_logits"] = output.detach()

    @torch.no_grad()
    def annotate(self, microbatches: list[dict[str, torch.Tensor]]) -> None:
        """Pipelined teacher: its outputs for this step's microbatches, stored in them on the last pipeline
        stage. Collective over tp and pp (each dp replica runs its own microbatches)."""
        if not self.pipelined:
            return

        def teacher_step(batch: dict[str, torch.Tensor], model: torch.nn.Module):
            logits = model(batch["tokens"], **model_inputs(batch))

            def record(output: torch.Tensor):
                self._record(batch, output)
                return output.new_zeros(()), {}

            return logits, record

        was_training = self.teacher.training
        self.teacher.eval()
        with self.precision.autocast():
            forward_pass(teacher_step, microbatches, self.teacher, self.dims)
        self.teacher.train(was_training)

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        if not self.pipelined:  # the teacher's forward for this microbatch only, then the student's
            self.teacher.eval()
            with torch.no_grad():
                self._record(batch, self.teacher(batch["tokens"], **model_inputs(batch)))
        logits = model(batch["tokens"], **model_inputs(batch))
        labels, mask = batch["labels"], batch["loss_mask"]

        def loss_fn(output: torch.Tensor):
            teacher = {k: batch.pop(k) for k in ("teacher_logits", "teacher_ids", "teacher_logps") if k in batch}
            if not teacher:
                raise RuntimeError("distillation: the microbatch has no teacher outputs; annotate() must run first "
                                   "(trainer/step.prepare_batches calls it)")
            # (popped: the teacher's outputs leave the microbatch once used, not held to the end of the step)
            kd = kl_per_token(output, teacher.get("teacher_logits"), self.tp, kind=self.kind,
                              temperature=self.temperature, top_ids=teacher.get("teacher_ids"),
                              top_logps=teacher.get("teacher_logps"), vocab_limit=self.vocab_limit)
            m = mask.to(kd.dtype)
            metrics = {"kd": (kd.detach() * m).sum()}
            per_token = self.alpha * self.temperature ** 2 * kd
            if self.alpha < 1.0:
                ce = cross_entropy_per_token(output, labels, self.tp, fused=self.fused)
                per_token = per_token + (1.0 - self.alpha) * ce
            else:  # the hard-label loss is still reported (it is what the student is finally judged by)
                with torch.no_grad():
                    ce = cross_entropy_per_token(output.detach(), labels, self.tp)
            metrics["ce"] = (ce.detach() * m).sum()
            return (per_token * m).sum(), metrics

        return logits, loss_fn
