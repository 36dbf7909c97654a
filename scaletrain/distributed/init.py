"""Process-group start-up from a DistEnv: nccl with CUDA, gloo on CPU, bounded timeouts."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from scaletrain.distributed.env import DistEnv, rendezvous


def init_distributed(env: DistEnv, device_type: str, timeout_s: float = 600.0) -> bool:
    """Initialise the default process group for `env`; True if this call created it (False at world
    size 1 or when the caller — a test harness, an outer launcher — already did).

    The rank-0 address comes from `rendezvous` (torchrun's MASTER_ADDR, the srun step's first node,
    or mpirun through mpi4py). A collective that waits longer than `timeout_s` for a peer raises
    instead of hanging (gloo and NCCL both honour the process-group timeout).
    """
    if env.world_size == 1 or dist.is_initialized():
        return False
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        init_method = "env://"  # torchrun's own store handling (agent store) stays in charge
    else:
        addr, port = rendezvous(env)
        init_method = f"tcp://{addr}:{port}"
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=env.rank,
                            world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
