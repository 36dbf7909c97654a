"""Microbatch schedules behind one contract (DESIGN rule 5).

A schedule calls `forward_step(batch, model) -> (output, loss_fn)` for every microbatch, then
`loss_fn(output) -> (loss_sum, metrics)`, where loss_sum is the objective *summed* over its items
(tokens, sequences, pairs…). The schedule divides by `normaliser` — the item count of the whole
global batch, computed once by the caller — before backward, so the accumulated gradient is the
gradient of the global mean whatever the microbatch split. The pipeline schedules (1F1B,
interleaved; parallel/pipeline/schedules.py) drive the same contract.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from scaletrain.profile.phases import phase

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
ForwardStep = Callable[[dict[str, torch.Tensor], torch.nn.Module], tuple[torch.Tensor, LossFn]]


def forward_backward_no_pipelining(forward_step: ForwardStep, microbatches: Sequence[dict[str, torch.Tensor]],
                                   model: torch.nn.Module, *, normaliser: float, forward_only: bool = False
                                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run all microbatches on one stage; gradients accumulate in `.grad` (or the dp buckets' main grads,
    whose reductions start during the last microbatch's backward: parallel/data_parallel.py).

    Returns the normalised loss of the global batch (a detached scalar on the model's device) and
    the summed per-microbatch metrics.
    """
    total = torch.zeros((), dtype=torch.float64)
    summed: dict[str, Any] = {}
    for batch in microbatches:
        with torch.set_grad_enabled(not forward_only), phase("forward"):
            output, loss_fn = forward_step(batch, model)
            loss_sum, metrics = loss_fn(output)
            loss = loss_sum / normaliser
        if not forward_only:
            with phase("backward"):
                loss.backward()
        total = total + loss.detach().to(total.device, torch.float64)
        for k, v in metrics.items():
            summed[k] = summed.get(k, 0) + v.detach()
    return total, summed
