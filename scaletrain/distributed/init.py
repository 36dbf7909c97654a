"""Process-group start-up from a DistEnv: nccl with CUDA, gloo on CPU, bounded timeouts."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from scaletrain.distributed.env import DistEnv


def init_distributed(env: DistEnv, device_type: str, timeout_s: float = 600.0) -> bool:
    """Initialise the default process group for `env`; True if this call created it (False at world
    size 1 or when the caller — a test harness, an outer launcher — already did).

    torchrun provides MASTER_ADDR/MASTER_PORT; srun and mpirun launches must export them (the
    launch scripts do). A collective that waits longer than `timeout_s` raises instead of hanging.
    """
    if env.world_size == 1 or dist.is_initialized():
        return False
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"{env.launcher} launch with {env.world_size} processes but {var} is not set; "
                               "launch with torchrun or export MASTER_ADDR/MASTER_PORT.")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
