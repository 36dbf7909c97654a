"""The only place that reads launcher variables (torchrun, Slurm srun, Open MPI / PMI).

DESIGN rule 11: everything else receives a DistEnv.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. launcher: 'torchrun', 'slurm', 'mpi' or 'single'."""

    rank: int
    local_rank: int
    world_size: int
    launcher: str


def _int(env: dict[str, str], *names: str) -> int | None:
    for n in names:
        if n in env and env[n].strip():
            return int(env[n])
    return None


def read_env(env: dict[str, str] | None = None) -> DistEnv:
    """Rank, local rank and world size from torchrun, srun or mpirun variables; one process otherwise.

    torchrun's variables win (torchrun inside an srun step sets them per worker).
    """
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistEnv(int(env["RANK"]), _int(env, "LOCAL_RANK") or 0, int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return DistEnv(int(env["SLURM_PROCID"]), _int(env, "SLURM_LOCALID") or 0, int(env["SLURM_NTASKS"]), "slurm")
    world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
    if world is not None:
        rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") or 0
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID") or 0
        return DistEnv(rank, local, world, "mpi")
    return DistEnv(0, 0, 1, "single")
