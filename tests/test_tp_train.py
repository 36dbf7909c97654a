"""Training through the real entry point at tp=2 (+SP): checkpoints, exact resume, torchrun."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY, read_metrics, tiny_overrides
from dist_harness import cli_rank, run_ranks

pytestmark = pytest.mark.parity


def _args(run_dir, tokenizer_dir, prefix, **extra) -> list[str]:
    args = ["train", "--config", TINY]
    for item in tiny_overrides(run_dir, tokenizer_dir, prefix, **{"parallel.tp": 2,
                                                                 "parallel.sequence_parallel": True, **extra}):
        args += ["--set", item]
    return args


def test_tp2_sp_trains_checkpoints_and_resumes_exactly(tmp_path, tokenizer_dir, dataset_prefix):
    straight, stopped, single = tmp_path / "straight", tmp_path / "stopped", tmp_path / "single"
    assert run_ranks(2, cli_rank, _args(straight, tokenizer_dir, dataset_prefix), timeout=120) == [0, 0]
    for expected in (5, 10, 12):  # the stopped run also writes its checkpoints asynchronously
        assert run_ranks(2, cli_rank, _args(stopped, tokenizer_dir, dataset_prefix, **{
            "train.exit_interval": 5, "checkpoint.async_save": True, "checkpoint.interval": 2}),
                         timeout=120) == [0, 0]
        assert len(read_metrics(stopped)) == expected
    assert [r["loss"] for r in read_metrics(stopped)] == [r["loss"] for r in read_metrics(straight)]
    ckpt = straight / "checkpoints" / "step_0000012"
    assert sorted(p.name for p in ckpt.glob("rank_*.json")) == ["rank_0.json", "rank_1.json"]
    # The same run on one process: tp changes float32 rounding only.
    from scaletrain.cli import main

    args = ["train", "--config", TINY]
    for item in tiny_overrides(single, tokenizer_dir, dataset_prefix):
        args += ["--set", item]
    assert main(args) == 0
    for a, b in zip(read_metrics(straight), read_metrics(single)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"]


def test_checkpoint_files_hold_global_shapes(tmp_path, tokenizer_dir, dataset_prefix):
    run = tmp_path / "run"
    assert run_ranks(2, cli_rank, _args(run, tokenizer_dir, dataset_prefix, **{"train.steps": 2}),
                     timeout=120) == [0, 0]
    from scaletrain.checkpoint.files import stored_tensors

    shapes = stored_tensors(run / "checkpoints" / "step_0000002")
    assert shapes["model.embed.weight"][0] == (512, 32)  # full vocabulary, saved by two ranks
    assert shapes["model.layers.0.mlp.gate_up.weight"][0] == (2, 64, 32)
    assert shapes["optim.state.layers.0.attn.proj.weight.exp_avg"][0] == (32, 32)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_torchrun_tp2_sequence_parallel(tmp_path, tokenizer_dir, dataset_prefix):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run = tmp_path / "run"
    sets = []
    for item in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
            "parallel.tp": 2, "parallel.sequence_parallel": True, "train.exit_interval": 6, "train.steps": 8}):
        sets += ["--set", item]
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "scaletrain.train",
           "--config", TINY, *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for expected in (6, 8):  # stop at the exit interval, then resume to the end
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(read_metrics(run)) == expected
    assert "layout tp2·pp1·dp1" in r.stdout and "resumed from" in r.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000008"
