"""parallelize(model, dims, cfg): the one place that turns a built model into a parallel one (DESIGN rule 2).

Order, as each later piece lands: (1) bind the tp communicator and sequence parallelism to every
role layer and mark the parameters whose gradients must be summed over tp; (2) split pipeline
stages; (3) activation recomputation; (4) torch.compile; (5) data-parallel wrapping.
Only (1) exists today; the others are refused up front by config validation.
"""

from __future__ import annotations

import torch

from scaletrain.config.schema import ParallelConfig
from scaletrain.distributed.dims import ParallelDims
from scaletrain.nn.linear import TPBound
from scaletrain.nn.norm import RMSNorm


def parallelize(model: torch.nn.Module, dims: ParallelDims, cfg: ParallelConfig) -> torch.nn.Module:
    """Bind tp/SP in place and return the model.

    Under sequence parallelism each tp rank normalises a different slice of the sequence, so
    RMSNorm weights (replicated over tp) get partial gradients: they are tagged
    `sequence_parallel_grad` and summed over tp by `finalize_grads`.
    """
    sp = cfg.sequence_parallel and dims.tp > 1
    for module in model.modules():
        if isinstance(module, TPBound):
            module.bind_tp(dims.tp_comm, sp)
        if sp and isinstance(module, RMSNorm):
            module.weight.sequence_parallel_grad = True  # type: ignore[attr-defined]
    return model
