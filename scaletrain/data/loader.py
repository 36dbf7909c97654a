"""Step-wise batch iteration, resumable from a consumed-sample count.

Global batch g covers samples [g·G, (g+1)·G) of the (already shuffled) dataset. Data-parallel rank
r reads the r-th contiguous slice of G/dp samples and cuts it into microbatches of M, so the
samples a step sees do not depend on how many microbatches or ranks share it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class _MicrobatchSampler(Sampler[list[int]]):
    def __init__(self, dataset_len: int, start_sample: int, global_batch: int, micro_batch: int,
                 dp_rank: int, dp_size: int, num_steps: int | None) -> None:
        self.dataset_len, self.start = dataset_len, start_sample
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size, self.num_steps = dp_rank, dp_size, num_steps

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch // self.dp_size
        step = 0
        while self.num_steps is None or step < self.num_steps:
            base = self.start + step * self.global_batch + self.dp_rank * per_rank
            for m in range(0, per_rank, self.micro_batch):
                yield [(base + m + i) % self.dataset_len for i in range(self.micro_batch)]
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("infinite sampler")
        return self.num_steps * (self.global_batch // self.dp_size) // self.micro_batch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave stop signals (config/validate.py STOP_SIGNALS) to the training process,
    which checkpoints on them (trainer/stop.py): Slurm and a terminal send them to every process, and
    a worker that died of one (torch's worker handler re-raises an outside SIGTERM) would take the
    trainer down before it saved. The workers still end when the trainer shuts them down or dies."""
    for name in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"):
        signal.signal(signal.Signals[name], signal.SIG_IGN)


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack every field of the samples (tokens, labels, loss_mask, position_ids, document_ids, …)."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


class StepBatches:
    """Yields, per optimizer step, this dp rank's list of microbatches (dicts of [M, S] tensors).

    `consumed_samples` is the global count of samples already used; it is what a checkpoint stores.
    A `BatchSource` (trainer/contracts.py) with no metrics of its own.
    """

    console_keys: tuple[str, ...] = ()

    def __init__(self, dataset, *, global_batch: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0, num_steps: int | None = None, num_workers: int = 0) -> None:
        self.global_batch = global_batch
        self.microbatches_per_step = global_batch // (micro_batch * dp_size)
        self.consumed_samples = consumed_samples
        sampler = _MicrobatchSampler(len(dataset), consumed_samples, global_batch, micro_batch,
                                     dp_rank, dp_size, num_steps)
        self._loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                  persistent_workers=num_workers > 0,
                                  worker_init_fn=ignore_stop_signals if num_workers else None)
        self._it = iter(self._loader)

    def __iter__(self) -> StepBatches:
        return self

    def metrics(self) -> dict[str, float]:
        return {}

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        batches = [next(self._it) for _ in range(self.microbatches_per_step)]
        self.consumed_samples += self.global_batch
        return batches
