"""End to end through the CLI, in-process (one megatron.core import per session) unless marked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaletrain.cli import main

from conftest import REPO, TINY, read_metrics, tiny_overrides

pytestmark = pytest.mark.e2e


def _train(run_dir, tokenizer_dir, prefix, **extra) -> int:
    args = ["train", "--config", TINY]
    for item in tiny_overrides(run_dir, tokenizer_dir, prefix, **extra):
        args += ["--set", item]
    return main(args)


def test_loss_falls_and_every_sink_writes(tmp_path, tokenizer_dir, dataset_prefix, capsys):
    run = tmp_path / "run"
    assert _train(run, tokenizer_dir, dataset_prefix, **{
        "train.steps": 40, "train.eval_interval": 20, "logging.interval": 10, "logging.tensorboard": True,
        "optim.lr": 3e-3}) == 0
    out = capsys.readouterr().out
    assert "step 10/40" in out and "ETA" in out and "tok/s" in out and "MFU" not in out  # no MFU on a CPU
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mem_gb"):
        assert key in records[0]
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.7, (first, last)  # ~6.2 → ~5.2 in 40 steps of a 2-layer model
    assert "val_loss" in records[19] and "val_loss" in records[39] and "val_loss" not in records[10]
    assert records[39]["val_loss"] < records[19]["val_loss"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000040"
    ckpt = run / "checkpoints" / "step_0000040"
    files = {p.suffix for p in ckpt.iterdir() if p.is_file()}
    assert files == {".safetensors", ".json"}  # nothing pickled
    assert (ckpt / "tokenizer" / "tokenizer.model").is_file()  # self-contained: exports on its own
    assert "hidden_size = 32" in (run / "config.toml").read_text()


def test_resume_after_exit_interval_reproduces_uninterrupted_losses(tmp_path, tokenizer_dir, dataset_prefix):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _train(straight, tokenizer_dir, dataset_prefix) == 0
    reference = [r["loss"] for r in read_metrics(straight)]
    for expected_steps in (5, 10, 12):  # each launch stops at the next multiple of 5, then the end
        assert _train(stopped, tokenizer_dir, dataset_prefix, **{"train.exit_interval": 5}) == 0
        assert len(read_metrics(stopped)) == expected_steps
    resumed = read_metrics(stopped)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == reference  # bit-exact on CPU in deterministic mode
    assert [r["lr"] for r in resumed] == [r["lr"] for r in read_metrics(straight)]


def test_resume_drops_metrics_written_after_the_last_checkpoint(tmp_path, tokenizer_dir, dataset_prefix):
    run = tmp_path / "run"
    assert _train(run, tokenizer_dir, dataset_prefix, **{"train.exit_interval": 4}) == 0
    with (run / "metrics.jsonl").open("a") as f:  # as if the run had crashed after logging step 5
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    assert _train(run, tokenizer_dir, dataset_prefix, **{"train.steps": 6}) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[4]["loss"] != 123.0


def test_gradient_accumulation_matches_one_big_microbatch(tmp_path, tokenizer_dir, dataset_prefix):
    runs = {}
    for mbs in (4, 1):
        run = tmp_path / f"mbs{mbs}"
        assert _train(run, tokenizer_dir, dataset_prefix, **{
            "train.micro_batch_size": mbs, "train.steps": 4, "precision.dtype": "float64"}) == 0
        runs[mbs] = read_metrics(run)
    for a, b in zip(runs[4], runs[1]):
        assert abs(a["loss"] - b["loss"]) <= 1e-12 * abs(a["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-10 * abs(a["grad_norm"])


@pytest.mark.parametrize("override,message", [
    ("train.stpes=3", "unknown key 'train.stpes'. Did you mean 'steps'?"),
    ('data.prefixes=["/nonexistent/data"]', "/nonexistent/data.idx does not exist"),
    ("model.vocab_size=256", "model.vocab_size = 256 is smaller than the tokenizer's 512 tokens"),
    ("train.global_batch_size=5", "global_batch_size = 5 is not divisible"),
    ("data.tokenizer=/nonexistent/tok", "tokenizer /nonexistent/tok does not exist"),
    ('train.stop_signals=["SIGKILL"]', "train.stop_signals: 'SIGKILL' is not one of SIGUSR1"),
    ("parallel.timeout_s=0", "parallel.timeout_s = 0.0 must be positive"),
])
def test_bad_input_fails_before_any_work(tmp_path, tokenizer_dir, dataset_prefix, capsys, override, message):
    run = tmp_path / "run"
    args = ["train", "--config", TINY]
    for item in tiny_overrides(run, tokenizer_dir, dataset_prefix):
        args += ["--set", item]
    assert main(args + ["--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()  # nothing was created


def test_checkpoint_every_n_steps_keeps_last_k(tmp_path, tokenizer_dir, dataset_prefix):
    run = tmp_path / "run"
    assert _train(run, tokenizer_dir, dataset_prefix, **{"checkpoint.interval": 3, "checkpoint.keep_last": 2}) == 0
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_0000009", "step_0000012"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_wandb_offline(tmp_path, tokenizer_dir, dataset_prefix, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert _train(run, tokenizer_dir, dataset_prefix, **{"train.steps": 3, "logging.wandb": True}) == 0
    runs = list((run / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_console_script_and_module_entry_points(tmp_path, tokenizer_dir, dataset_prefix):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    sets = []
    for item in tiny_overrides(tmp_path / "cli", tokenizer_dir, dataset_prefix, **{"train.steps": 3}):
        sets += ["--set", item]
    scaletrain = Path(sys.executable).with_name("scaletrain")
    r = subprocess.run([str(scaletrain), "train", "--config", TINY, *sets], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "step 3/3" in r.stdout and "saved checkpoint" in r.stdout
    sets = [s.replace(str(tmp_path / "cli"), str(tmp_path / "mod")) for s in sets]
    r = subprocess.run([sys.executable, "-m", "scaletrain.train", "--config", TINY, *sets], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_metrics(tmp_path / "mod")[-1]["loss"] == read_metrics(tmp_path / "cli")[-1]["loss"]


def _kill_while_saving(sets: list[str], run_dir: Path, step: int) -> None:
    """Run the CLI in a subprocess whose save of `step` is held before publishing, and SIGKILL it there."""
    import signal
    import time

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SCALETRAIN_FAULT_SAVE_DELAY_S": "30"}
    proc = subprocess.Popen([sys.executable, "-m", "scaletrain.train", "--config", TINY, *sets], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / f".step_{step:07d}.tmp" / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before saving"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path, tokenizer_dir, dataset_prefix):
    """A real SIGKILL during a checkpoint write: `latest` still names the previous complete checkpoint,
    and resuming from it finishes with the uninterrupted run's losses."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = {"checkpoint.interval": 3, "train.steps": 9}
    assert _train(straight, tokenizer_dir, dataset_prefix, **extra) == 0
    sets = []
    for item in tiny_overrides(killed, tokenizer_dir, dataset_prefix, **extra):
        sets += ["--set", item]
    _kill_while_saving(sets, killed, 3)  # inside the very first save
    assert not (killed / "checkpoints" / "latest").exists()  # nothing half-written was published
    assert _train(killed, tokenizer_dir, dataset_prefix, **{**extra, "train.exit_interval": 3}) == 0
    _kill_while_saving(sets, killed, 6)  # now with a complete step-3 checkpoint behind it
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert _train(killed, tokenizer_dir, dataset_prefix, **extra) == 0  # resumes from step 3, cleans up
    assert [r["loss"] for r in read_metrics(killed)] == [r["loss"] for r in read_metrics(straight)]
    assert not list((killed / "checkpoints").glob(".*tmp*"))


def test_async_save_resumes_exactly(tmp_path, tokenizer_dir, dataset_prefix):
    """checkpoint.async_save: training continues while the copy is written; resume is still exact."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    extra = {"checkpoint.interval": 2, "checkpoint.async_save": True, "checkpoint.keep_last": 0}
    assert _train(straight, tokenizer_dir, dataset_prefix, **extra) == 0
    for _ in range(3):
        assert _train(stopped, tokenizer_dir, dataset_prefix, **extra, **{"train.exit_interval": 5}) == 0
    assert [r["loss"] for r in read_metrics(stopped)] == [r["loss"] for r in read_metrics(straight)]
    saved = sorted(p.name for p in (straight / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved == [f"step_{s:07d}" for s in (2, 4, 6, 8, 10, 12)]
