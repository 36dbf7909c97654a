"""launch/ on nemo-run: the Slurm dry run matches slurm/pretrain.sbatch, the local executor trains, a
layout sweep runs and reports, and a bad config is refused before anything is submitted."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY, read_metrics, tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def launcher(module: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def torchrun_call(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """Options of a torchrun command line (either spelling) and the program part from -m on."""
    start = next(i for i, t in enumerate(tokens) if t.endswith("torchrun") or t == "torch.distributed.run") + 1
    end = tokens.index("-m", start)
    opts: dict[str, str] = {}
    it = iter(tokens[start:end])
    for t in it:
        key, _, value = t.partition("=")
        opts[key.lstrip("-").replace("_", "-")] = value if value else next(it)
    return opts, tokens[end:]


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script, re.M))


RUN_ARGS = ["--config", "configs/llama3_8b.toml", "--set", "parallel.tp=8", "--set", 'data.prefixes=["data/web"]',
            "--set", "data.tokenizer=data/llama3"]


def test_slurm_dryrun_is_equivalent_to_the_sbatch_script(tmp_path):
    pytest.importorskip("nemo_run")
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol (Slurm client) not installed: tests/slurm/setup.sh installs it")
    r = launcher("launch.pretrain", [*RUN_ARGS, "--executor", "slurm", "--nodes", "4", "--gpus-per-node", "8",
                                     "--partition", "batch", "--time", "24:00:00", "--dryrun", "--job-dir",
                                     str(tmp_path)])
    assert r.returncode == 0, r.stderr
    nemo = r.stdout[r.stdout.index("#!/bin/bash"):]
    nemo_sbatch = sbatch_options(nemo)
    srun_line = next(line for line in nemo.splitlines() if line.startswith("srun "))
    nemo_opts, nemo_prog = torchrun_call(shlex.split(srun_line))

    # The sbatch script in slurm/, in its dry-run mode, inside a faked 4-node × 8-GPU allocation.
    env = dict(os.environ, SCALETRAIN_DRYRUN="1", SLURM_JOB_ID="4242", SLURM_NNODES="4", SLURM_GPUS_ON_NODE="8",
               SLURM_JOB_NODELIST="gpu[01-04]", SLURM_SUBMIT_DIR=str(REPO), SCALETRAIN_LOG_DIR=str(tmp_path / "logs"))
    ours = subprocess.run(["bash", str(REPO / "slurm" / "pretrain.sbatch"), *RUN_ARGS], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert ours.returncode == 0, ours.stderr
    our_sbatch = sbatch_options((REPO / "slurm" / "pretrain.sbatch").read_text())
    banner, cmd = ours.stdout.strip().splitlines()[-2:]
    our_opts, our_prog = torchrun_call(shlex.split(cmd))

    # Same allocation semantics: nodes × GPUs (ours come from the sbatch command line), USR1 ahead of
    # the limit, appended logs over requeues, requeue allowed (nemo-run passes --requeue to sbatch).
    assert nemo_sbatch["nodes"] == "4" and nemo_sbatch["gpus-per-node"] == "8" and nemo_sbatch["time"] == "24:00:00"
    assert nemo_sbatch["signal"] == our_sbatch["signal"] == "USR1@180"
    assert nemo_sbatch["open-mode"] == our_sbatch["open-mode"] == "append"
    assert "requeue" in our_sbatch and "sbatch --requeue" in r.stdout
    # Same step: srun killing the job on a bad exit, torchrun with c10d over 4 nodes × 8, same program.
    assert "--kill-on-bad-exit=1" in srun_line and "--kill-on-bad-exit=1" in cmd
    for key in ("nnodes", "nproc-per-node", "rdzv-backend"):
        assert nemo_opts[key] == our_opts[key], key
    assert our_opts["nnodes"] == "4" and our_opts["nproc-per-node"] == "8" and our_opts["rdzv-backend"] == "c10d"
    assert nemo_prog == our_prog == ["-m", "scaletrain.cli", "train", *RUN_ARGS]
    # Same cluster environment file.
    assert "source " + str(REPO / "slurm" / "env" / "default.sh") in nemo and "env slurm/env/default.sh" in banner


def test_posttrain_script_runs_the_stage_subcommand(tmp_path):
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol (Slurm client) not installed: tests/slurm/setup.sh installs it")
    env = dict(os.environ, SCALETRAIN_DRYRUN="1", SCALETRAIN_LAUNCH="srun", SLURM_JOB_ID="7", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="8", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_SUBMIT_DIR=str(REPO),
               SCALETRAIN_LOG_DIR=str(tmp_path))
    script = str(REPO / "slurm" / "posttrain.sbatch")
    r = subprocess.run(["bash", script, "sft", "--config", "configs/x.toml"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert cmd[:1] == ["srun"] and "--ntasks=16" in cmd and "--ntasks-per-node=8" in cmd
    assert cmd[-5:] == ["-m", "scaletrain.cli", "sft", "--config", "configs/x.toml"]
    r = subprocess.run(["bash", script, "--config", "x.toml"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "first argument is the stage subcommand" in r.stderr


def test_local_executor_trains(tmp_path, tokenizer_dir, dataset_prefix):
    pytest.importorskip("nemo_run")
    run_dir = tmp_path / "run"
    sets = tiny_overrides(run_dir, tokenizer_dir, dataset_prefix, **{"parallel.tp": 2, "train.steps": 6})
    r = launcher("launch.pretrain", ["--config", TINY, *[a for s in sets for a in ("--set", s)], "--executor", "local",
                                     "--gpus-per-node", "0", "--nproc-per-node", "2", "--job-dir", str(tmp_path / "nr")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout
    assert len(read_metrics(run_dir)) == 6 and (run_dir / "checkpoints" / "latest").is_file()


def test_sweep_runs_each_valid_layout_and_reports(tmp_path, tokenizer_dir, dataset_prefix):
    pytest.importorskip("nemo_run")
    sets = tiny_overrides(tmp_path / "sweep", tokenizer_dir, dataset_prefix)
    r = launcher("launch.sweep", ["--config", TINY, *[a for s in sets for a in ("--set", s)], "--executor", "local",
                                  "--gpus-per-node", "0", "--nproc-per-node", "2", "--tp", "1,2,4", "--pp", "1",
                                  "--steps", "4", "--skip", "1", "--job-dir", str(tmp_path / "nr")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "skip tp4-pp1: tp 4 > 2 processes per node" in r.stdout
    table = r.stdout[r.stdout.index("layout "):]
    assert re.search(r"^tp1-pp1-dp2\s+[\d,]+\s+[\d.]+", table, re.M), table
    assert re.search(r"^tp2-pp1-dp1\s+[\d,]+\s+[\d.]+", table, re.M), table


def test_bad_config_is_refused_before_submitting(tmp_path):
    r = launcher("launch.pretrain", ["--config", TINY, "--set", "parallel.tp=3", "--executor", "slurm",
                                     "--nodes", "1", "--gpus-per-node", "8", "--dryrun"])
    assert r.returncode == 2
    assert "launch: error:" in r.stderr and "parallel.tp = 3" in r.stderr
