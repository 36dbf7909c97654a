"""The default validation: the objective's mean loss (and metrics) over the same held-out batches every time,
so validation losses compare across steps and runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from scaletrain.distributed.dims import ParallelDims
from scaletrain.trainer.contracts import Batch, Objective, Validator
from scaletrain.trainer.precision import Precision
from scaletrain.trainer.step import evaluate


class LossValidation(Validator):
    """evaluate() of `objective` over a fresh iterable of per-step microbatch lists (`batches()`)."""

    def __init__(self, model: torch.nn.Module, objective: Objective, batches: Callable[[], Iterable[list[Batch]]], *,
                 precision: Precision, device: torch.device, dims: ParallelDims) -> None:
        self.model, self.objective, self.batches = model, objective, batches
        self.precision, self.device, self.dims = precision, device, dims

    def __call__(self) -> tuple[float | None, dict[str, float]]:
        return evaluate(self.model, self.objective, self.batches(), precision=self.precision, device=self.device,
                        dims=self.dims)
