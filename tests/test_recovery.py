"""Recovery (issue 21 §3): a run directory without its `latest` pointer, exports into an existing
export, SIGTERM / SIGINT, and a torn metrics.jsonl."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scaletrain.cli import main
from scaletrain.trainer.sinks import truncate_jsonl
from scaletrain.trainer.stop import EXIT_INTERRUPTED, EXIT_REQUEUE

from conftest import REPO, TINY, read_metrics, tiny_overrides

pytestmark = pytest.mark.e2e


def _args(run_dir, tokenizer_dir, prefix, **extra) -> list[str]:
    args = ["train", "--config", TINY]
    for item in tiny_overrides(run_dir, tokenizer_dir, prefix, **extra):
        args += ["--set", item]
    return args


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of every file under `root`: any rewrite or re-save changes them."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---- a run directory whose `latest` is missing or not a file ------------------------------------------

RESUME = {"train.steps": 9, "checkpoint.interval": 3, "checkpoint.keep_last": 0}


@pytest.mark.parametrize("damage", ["missing", "dangling symlink", "symlink to a directory"])
def test_without_latest_the_run_resumes_from_the_newest_complete_checkpoint(tmp_path, tokenizer_dir, dataset_prefix,
                                                                          capsys, damage):
    """Before: the run started again at step 0 and re-saved step_3 and step_6 over the existing ones."""
    run = tmp_path / "run"
    assert main(_args(run, tokenizer_dir, dataset_prefix, **RESUME, **{"train.exit_interval": 6})) == 0
    ckpts = run / "checkpoints"
    latest = ckpts / "latest"
    latest.unlink()
    if damage == "dangling symlink":
        latest.symlink_to(ckpts / "step_0000042")
    elif damage == "symlink to a directory":
        latest.symlink_to(ckpts / "step_0000003")
    before = {name: _snapshot(ckpts / name) for name in ("step_0000003", "step_0000006")}
    (ckpts / ".step_0000009.tmp").mkdir()  # a crashed save's leftover is not a complete checkpoint
    capsys.readouterr()
    assert main(_args(run, tokenizer_dir, dataset_prefix, **RESUME)) == 0
    out = capsys.readouterr()
    what = "is missing" if damage == "missing" else "is not a file"
    assert f"{latest} {what}; resuming from the newest complete checkpoint, {ckpts / 'step_0000006'}" in out.err
    assert f"resumed from {ckpts / 'step_0000006'} at step 6" in out.out
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 10))
    assert {name: _snapshot(ckpts / name) for name in before} == before  # never rewritten
    assert latest.is_file() and not latest.is_symlink() and latest.read_text().strip() == "step_0000009"


def test_a_latest_directory_or_only_incomplete_checkpoints_are_refused(tmp_path, tokenizer_dir, dataset_prefix,
                                                                       capsys):
    run = tmp_path / "run"
    assert main(_args(run, tokenizer_dir, dataset_prefix, **{**RESUME, "train.steps": 3})) == 0
    ckpts = run / "checkpoints"
    (ckpts / "latest").unlink()
    (ckpts / "latest").mkdir()
    before = _snapshot(ckpts)
    assert main(_args(run, tokenizer_dir, dataset_prefix, **RESUME)) == 2
    assert f"{ckpts / 'latest'} is a directory, not the pointer file" in capsys.readouterr().err
    (ckpts / "latest").rmdir()
    (ckpts / "step_0000003" / "trainer_state.json").unlink()
    before = _snapshot(ckpts)
    assert main(_args(run, tokenizer_dir, dataset_prefix, **RESUME)) == 2
    assert "holds step_0000003 but none is complete" in capsys.readouterr().err
    assert _snapshot(ckpts) == before


def test_convert_to_hf_without_latest_exports_the_newest_complete_checkpoint(tmp_path, tokenizer_dir,
                                                                            dataset_prefix, capsys):
    """Before: `convert to-hf RUN/checkpoints` with `latest` missing failed ("not a complete checkpoint")."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert main(_args(run, tokenizer_dir, dataset_prefix, **{**RESUME, "train.steps": 6})) == 0
    ckpts = run / "checkpoints"
    (ckpts / "latest").unlink()
    capsys.readouterr()
    assert main(["convert", "to-hf", str(ckpts), str(tmp_path / "from_folder")]) == 0
    assert f"resuming from the newest complete checkpoint, {ckpts / 'step_0000006'}" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(ckpts / "step_0000006"), str(tmp_path / "direct")]) == 0
    a = load_file(tmp_path / "from_folder" / "model.safetensors")
    b = load_file(tmp_path / "direct" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (ckpts / "latest").exists()  # an export never writes into the run


# ---- convert to-hf into an existing export ------------------------------------------------------------

def _hf_checkpoint(tmp_path, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A scaletrain checkpoint imported from a random transformers Llama; returns it and the HF weights."""
    transformers = pytest.importorskip("transformers")
    from scaletrain.checkpoint.hf import import_from_hf

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    hf = tmp_path / f"hf{seed}"
    model.save_pretrained(hf, safe_serialization=True)
    return import_from_hf(hf, tmp_path / f"ckpt{seed}"), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _loaded(out: Path) -> dict[str, torch.Tensor]:
    import transformers

    from scaletrain.checkpoint.hf import read_hf_dir

    read_hf_dir(out)  # our own reader takes every *.safetensors in the directory: it must see one export
    model = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("first,second", [("sharded", "single"), ("single", "sharded")])
def test_export_into_an_existing_export_replaces_it_whole(tmp_path, capsys, first, second):
    """Before: a sharded export left over a single-file one (or the reverse) kept the stale files, and
    transformers loaded the old model.safetensors instead of the new shards."""
    (a, _), (b, b_weights) = _hf_checkpoint(tmp_path, 1), _hf_checkpoint(tmp_path, 2)
    out = tmp_path / "export"
    shard = {"sharded": ["--max-shard-gb", str(40_000 / 2**30)], "single": []}
    assert main(["convert", "to-hf", str(a), str(out), *shard[first]]) == 0
    assert main(["convert", "to-hf", str(b), str(out), *shard[second]]) == 0
    names = {p.name for p in out.iterdir()}
    if second == "single":
        assert "model.safetensors" in names and not any(n.startswith("model-") or n.endswith("index.json") for n in names)
    else:
        assert "model.safetensors" not in names and "model.safetensors.index.json" in names
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert {p.name for p in out.glob("*.safetensors")} == set(index["weight_map"].values())
    loaded = _loaded(out)
    assert loaded.keys() == b_weights.keys()
    assert all(torch.equal(loaded[k], b_weights[k]) for k in b_weights)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # nothing left beside it


def test_a_failed_or_refused_export_leaves_the_directory_as_it_was(tmp_path, monkeypatch, capsys):
    from scaletrain.checkpoint import atomic_dir

    (a, a_weights), (b, _) = _hf_checkpoint(tmp_path, 1), _hf_checkpoint(tmp_path, 2)
    out = tmp_path / "export"
    monkeypatch.setattr(atomic_dir, "exchange", lambda x, y: False)  # the two-rename path, as without renameat2
    assert main(["convert", "to-hf", str(a), str(out)]) == 0
    before = _snapshot(out)
    import scaletrain.export as export

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(export, "write_hf_dir", full_disk)
    with pytest.raises(OSError, match="No space left"):
        main(["convert", "to-hf", str(b), str(out)])
    assert _snapshot(out) == before
    loaded = _loaded(out)
    assert all(torch.equal(loaded[k], a_weights[k]) for k in a_weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt1", "ckpt2", "hf1", "hf2", "export"])
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert main(["convert", "to-hf", str(b), str(other)]) == 2
    assert "is not empty and holds no config.json" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["todo.txt"]


# ---- signals --------------------------------------------------------------------------------------------

def _run_and_signal(sets: list[str], run_dir: Path, sig: signal.Signals, after_steps: int):
    """Run the CLI in a session of its own and send `sig` to every process in it (the trainer and its
    data workers), as Slurm signals a job step's processes and a terminal its foreground group."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "scaletrain.train", "--config", TINY, *sets], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= after_steps):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, EXIT_REQUEUE), (signal.SIGINT, EXIT_INTERRUPTED)])
def test_sigterm_and_sigint_checkpoint_at_the_step_boundary(tmp_path, tokenizer_dir, dataset_prefix, sig, code):
    """The real CLI with a data worker, signalled mid-run with the default train.stop_signals. Before:
    SIGTERM killed it on the spot (-15) and SIGINT ended in a KeyboardInterrupt traceback, both with
    nothing saved since the last interval checkpoint (and a data worker killed by SIGTERM took the
    trainer down with a RuntimeError)."""
    run = tmp_path / "run"
    sets = [a for item in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
        "train.steps": 2000, "checkpoint.interval": 1, "checkpoint.keep_last": 2, "data.num_workers": 1})
            for a in ("--set", item)]
    rc, out, err = _run_and_signal(sets, run, sig, 3)
    assert rc == code, err
    assert "Traceback" not in err and err.count(f"received {sig.name}") == 1  # the trainer, not its worker
    stopped = len(read_metrics(run))
    assert 3 <= stopped < 2000
    assert f"checkpointed after step {stopped}; exiting with code {code}" in out
    assert out.count(f"saved checkpoint {run / 'checkpoints' / f'step_{stopped:07d}'}") == 1  # by the interval only
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"


def test_a_stop_signal_during_start_up_exits_without_a_step(tmp_path, tokenizer_dir, dataset_prefix, monkeypatch,
                                                            capsys):
    """Nothing ran since the last checkpoint, so there is nothing to save (before: one step, then a save)."""
    from scaletrain.trainer.loop import Trainer

    real_run = Trainer.run

    def signalled_run(self):
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives while the run is still starting
        return real_run(self)
    monkeypatch.setattr(Trainer, "run", signalled_run)
    run = tmp_path / "run"
    assert main(_args(run, tokenizer_dir, dataset_prefix)) == EXIT_REQUEUE
    assert "before the first step: nothing to checkpoint since step 0" in capsys.readouterr().out
    assert not (run / "checkpoints").exists() and read_metrics(run) == []


# ---- metrics.jsonl ------------------------------------------------------------------------------------

def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, tokenizer_dir, dataset_prefix, capsys):
    """Before: json.loads failed on the torn line and the run could not resume."""
    run = tmp_path / "run"
    assert main(_args(run, tokenizer_dir, dataset_prefix, **{"train.exit_interval": 4})) == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 6.1, "lr": 0.00')  # the crash (or full disk) came mid-line
    assert main(_args(run, tokenizer_dir, dataset_prefix, **{"train.steps": 6})) == 0
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}: dropped line(s) 5 of 5" in err
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_during_the_metrics_rewrite_leaves_no_debris(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
    path.write_text(original)
    real_write = Path.write_text

    def full_disk(self, data, *args, **kwargs):  # as the OS does it: part of the data, then ENOSPC
        real_write(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        truncate_jsonl(path, 3)
    monkeypatch.setattr(Path, "write_text", real_write)
    assert path.read_text() == original and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_an_in_process_run_leaves_the_callers_torch_settings_as_they_were(tmp_path, tokenizer_dir, dataset_prefix):
    """train.deterministic and train.threads hold for the run only: a notebook or sweep that calls the CLI
    in-process gets its own settings back (before: deterministic algorithms stayed on after the run)."""
    torch.use_deterministic_algorithms(False)  # as a fresh process has it (tests that build trainers directly may not)
    threads = torch.get_num_threads()
    args = ["train", "--config", TINY]
    for s in tiny_overrides(tmp_path / "run", tokenizer_dir, dataset_prefix, **{"train.steps": 2,
                                                                                  "train.threads": threads + 1}):
        args += ["--set", s]
    assert main(args) == 0
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
