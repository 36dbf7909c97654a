"""Launcher variables → ranks, and the rank layout of ParallelDims."""

from __future__ import annotations

import os
from dataclasses import astuple

import pytest

from scaletrain.config.schema import ParallelConfig
from scaletrain.distributed import ParallelDims
from scaletrain.distributed import read_env as _read_env

from dist_harness import RankFailure, run_ranks

pytestmark = pytest.mark.parity


def read_env(env):
    return astuple(_read_env(env))


def test_torchrun_slurm_mpi_and_single():
    assert read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 1, 8, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}
    assert read_env(slurm) == (5, 1, 16, "slurm")
    # torchrun inside an srun step: torchrun's per-worker variables win.
    assert read_env({**slurm, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"})[3] == "torchrun"
    # An sbatch shell (no step) is not a task of a parallel job.
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"})[2] == 1
    mpi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert read_env(mpi) == (1, 1, 2, "mpi")
    assert read_env({}) == (0, 0, 1, "single")


def test_rank_layout_is_tp_fastest_then_cp_dp_pp():
    cfg = ParallelConfig(tp=2, pp=2, cp=1)
    layout = [(d.tp_rank, d.dp_rank, d.pp_rank) for d in
              (ParallelDims(tp=2, cp=1, dp=2, pp=2, vpp=1, rank=r) for r in range(8))]
    assert layout == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    single = ParallelDims.from_config(cfg.__class__(), 1, 0)
    assert single.mesh is None and single.tp_comm.size == 1


def _groups(rank, world):
    import torch.distributed as dist

    dims = ParallelDims.from_config(ParallelConfig(tp=2), world, rank)
    return dist.get_process_group_ranks(dims.tp_comm.group), dims.tp_rank


def test_tp_groups_are_contiguous_ranks():
    assert run_ranks(2, _groups) == [([0, 1], 0), ([0, 1], 1)]


def test_a_rank_that_dies_is_detected():
    def die(rank, world):
        import torch.distributed as dist

        if rank == 1:
            os._exit(3)
        dist.barrier()

    with pytest.raises(RankFailure, match="rank 1 died with exit code 3"):
        run_ranks(2, die, timeout=30)
