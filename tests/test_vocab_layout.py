"""A derived vocabulary (model.vocab_size = 0) does not depend on tp: fixed at the run's first start, recorded
in its checkpoints and config.toml, kept on resume at any layout — also after a SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from scaletrain.cli import main
from scaletrain.config import ConfigError, load_config
from scaletrain.config.schema import ModelConfig
from scaletrain.config.validate import resolve_model

from conftest import REPO, TINY, read_metrics, tiny_overrides
from dist_harness import cli_rank, run_ranks

pytestmark = pytest.mark.parity


def test_the_derived_size_is_the_same_at_every_tp_and_a_tp_that_does_not_divide_it_is_refused():
    sizes = {tp: resolve_model(ModelConfig(num_heads=8), tokenizer_vocab=300, tp=tp, seq_length=64).vocab_size
             for tp in (1, 2, 4, 8)}
    assert sizes == {1: 384, 2: 384, 4: 384, 8: 384}
    with pytest.raises(ConfigError, match=r"derives 128 rows .* do not split over parallel.tp = 3; .*"
                                          r"model.vocab_multiple a multiple of 3 \(e.g. 384\)"):
        resolve_model(ModelConfig(num_heads=6), tokenizer_vocab=100, tp=3, seq_length=64)
    assert resolve_model(ModelConfig(num_heads=6, vocab_multiple=384), tokenizer_vocab=100, tp=3,
                         seq_length=64).vocab_size == 384


# vocab_multiple 192 on the session tokenizer's 512 tokens: 576 rows, where the old rule (192 · tp) gave
# 768 at tp2 and 576 at tp1, so a tp2 checkpoint did not load at tp1 ("does not fit").
SHAPE = {"model.vocab_multiple": 192, "precision.dtype": "float64", "optim.distributed": True, "train.steps": 8,
         "checkpoint.interval": 3}
TP2_SP = {"parallel.tp": 2, "parallel.sequence_parallel": True}


def _sets(run, tokenizer_dir, prefix, **extra) -> list[str]:
    out = []
    for item in tiny_overrides(run, tokenizer_dir, prefix, **{**SHAPE, **extra}):
        out += ["--set", item]
    return out


def _torchrun(sets: list[str], nproc: int, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.Popen([torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "scaletrain.train",
                             "--config", TINY, *sets], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _children(pid: int) -> list[int]:
    from pathlib import Path

    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_a_derived_vocab_run_killed_at_tp2_sp_dp2_resumes_at_pp2_dp2_and_tp1_exactly(tmp_path, tokenizer_dir,
                                                                                     dataset_prefix):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(["train", "--config", TINY, *_sets(reference, tokenizer_dir, dataset_prefix)]) == 0
    # tp2+SP·dp2 with ZeRO-1: a checkpoint at step 3, then SIGKILL while step 6 is being written (held unpublished).
    sets = _sets(killed, tokenizer_dir, dataset_prefix, **TP2_SP)
    first = _torchrun(sets + ["--set", "train.exit_interval=3"], 4)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out[-3000:]
    proc = _torchrun(sets, 4, {"SCALETRAIN_FAULT_SAVE_DELAY_S": "120"})
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoints" / ".step_0000006.tmp" / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before saving step 6"
            time.sleep(0.1)
    finally:
        ranks = _children(proc.pid)  # torchrun starts each rank in a session of its own
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=120)  # torchrun sees its ranks die and exits
    assert ranks and proc.returncode != 0
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert len(read_metrics(killed)) == 6  # steps 4-6 ran after the checkpoint: they are redone on resume
    recorded = json.loads((killed / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert recorded["model_config"]["vocab_size"] == 576
    assert load_config(killed / "config.toml").model.vocab_size == 576

    expected = [r["loss"] for r in read_metrics(reference)]
    assert len(expected) == 8
    pp2 = tmp_path / "resumed-pp2-dp2"
    shutil.copytree(killed, pp2)
    args = ["train", "--config", TINY, *_sets(pp2, tokenizer_dir, dataset_prefix, **{"parallel.pp": 2})]
    assert run_ranks(4, cli_rank, args, timeout=300) == [0] * 4
    tp1 = tmp_path / "resumed-tp1"
    shutil.copytree(killed, tp1)
    assert main(["train", "--config", TINY, *_sets(tp1, tokenizer_dir, dataset_prefix)]) == 0
    for run in (pp2, tp1):
        losses = [r["loss"] for r in read_metrics(run)]
        assert len(losses) == 8
        for a, b in zip(losses, expected):  # steps 1-3 at tp2+SP·dp2, 4-8 at the resumed layout
            assert abs(a - b) <= 1e-10 * abs(b), (run.name, losses, expected)
        assert load_config(run / "config.toml").model.vocab_size == 576
