"""On-policy distillation's batches: per step, the current student's own completions of this dp
rank's prompts, as training rows whose loss covers the completion tokens (the Trainer's `train_batches`).

The student learns the teacher's distribution on the states it actually visits — its own samples —
rather than on reference text it would never have written (GKD, Agarwal et al. 2024; the per-token
reverse KL of on-policy distillation as Qwen3 and Thinking Machines use it). The teacher scores
every position of each sampled row in the objective's `annotate` pass (stages/distill/objective.py); no
reward, no advantage: the per-token KL is the signal.

Step k draws prompts k·B … k·B+B−1 (B = global batch) of the seeded per-epoch prompt order, dp rank
r taking the r-th contiguous B/dp of them, each with its own sampling generator, so the same run
samples the same completions at every layout and on resumption. Sampling runs on the training
layout (generation/sampler.py), at posttrain.rollout.temperature, up to posttrain.rollout.max_new_tokens, stopping at
eos or the chat template's end-of-turn marker.
"""

from __future__ import annotations

import time

import torch

from scaletrain.data.loader import collate
from scaletrain.distributed.dims import ParallelDims
from scaletrain.generation.batching import contiguous_share, training_rows
from scaletrain.generation.sampler import sample_completions, sampling_generator, stop_ids_for
from scaletrain.stages.rl.prompts import PromptDataset, PromptOrder
from scaletrain.trainer.contracts import BatchSource


class OnPolicyBatches(BatchSource):
    def __init__(self, prompts: PromptDataset, *, model: torch.nn.Module, dims: ParallelDims, global_batch: int, micro_batch: int,
                 seq_length: int, seed: int, consumed_samples: int, tokenizer, stop_text: str | None,
                 max_new_tokens: int, temperature: float, precision, device: torch.device,
                 width_multiple: int = 1, rollout_micro_batch: int = 0) -> None:
        self.prompts, self.model, self.dims = prompts, model, dims
        self.global_batch, self.micro_batch, self.seq_length = global_batch, micro_batch, seq_length
        self.rollout_micro = rollout_micro_batch or micro_batch  # rows per sampling forward
        self.seed, self.consumed_samples = seed, consumed_samples
        self.tokenizer, self.stop_text = tokenizer, stop_text
        self.stop_ids = stop_ids_for(tokenizer, stop_text)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.precision, self.device, self.width_multiple = precision, device, width_multiple
        self.order = PromptOrder(len(prompts), seed)
        self.last_metrics: dict[str, float] = {}
        self.console_keys = ("completion_tokens",)

    def __iter__(self) -> OnPolicyBatches:
        return self

    def metrics(self) -> dict[str, float]:
        return self.last_metrics

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        step = self.consumed_samples // self.global_batch
        self.consumed_samples += self.global_batch
        d = self.dims
        draws = [step * self.global_batch + j for j in contiguous_share(self.global_batch, d.dp, d.dp_rank)]
        prompts = [self.prompts.prompts[self.order[k]] for k in draws]
        t0 = time.perf_counter()
        completions, stopped = sample_completions(
            self.model, d, prompts, [sampling_generator(self.seed, k) for k in draws] if self.temperature else None,
            group_size=1, max_new_tokens=self.max_new_tokens, temperature=self.temperature, stop_ids=self.stop_ids,
            stop_text=self.stop_text, decode=self.tokenizer.decode, pad_id=self.pad_id,
            vocab_limit=self.tokenizer.vocab_size, micro_batch=self.rollout_micro, precision=self.precision,
            device=self.device, width_multiple=self.width_multiple)
        items = [training_rows(p, c, self.seq_length, self.pad_id) for p, c in zip(prompts, completions)]
        sums = torch.tensor([float(sum(len(c) for c in completions)), float(sum(not s for s in stopped)),
                             float(len(completions))], dtype=torch.float64)
        if d.dp > 1:
            sums = d.comm("dp").all_reduce(sums.to(self.device)).cpu()
        self.last_metrics = {"completion_tokens": float(sums[0] / sums[2]), "truncated": float(sums[1] / sums[2]),
                             "rollout_s": time.perf_counter() - t0}
        return [collate(items[s:s + self.micro_batch]) for s in range(0, len(items), self.micro_batch)]
