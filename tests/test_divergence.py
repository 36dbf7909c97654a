"""Divergence (issue 21 §2): non-finite steps stop the run on every rank together, pruning keeps the
newest good checkpoint, loss spikes warn / stop / roll back, bad learning rates and clips are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch

from scaletrain.cli import main
from scaletrain.config import ConfigError, load_config, resolve_model, validate
from scaletrain.distributed.comm import Comm
from scaletrain.trainer.divergence import EXIT_DIVERGED

from conftest import TINY, read_metrics, tiny_overrides
from dist_harness import run_ranks

pytestmark = pytest.mark.e2e


def _args(run_dir, tokenizer_dir, prefix, **extra) -> list[str]:
    args = ["train", "--config", TINY]
    for item in tiny_overrides(run_dir, tokenizer_dir, prefix, **extra):
        args += ["--set", item]
    return args


def _state(ckpt) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def test_nonfinite_steps_stop_the_run_and_pruning_keeps_the_last_good_checkpoint(tmp_path, tokenizer_dir,
                                                                                   dataset_prefix, capsys):
    """optim.lr = 1e30: step 1 is finite, its update makes every later gradient NaN (updates skipped).
    Before: the run skipped updates to the end, exited 0 and keep_last = 1 left only a diverged
    checkpoint. Now: three non-finite steps stop it with exit code 3 naming step 4, and the step-1
    checkpoint (the newest good one) survives pruning."""
    run = tmp_path / "run"
    code = main(_args(run, tokenizer_dir, dataset_prefix, **{
        "optim.lr": 1e30, "train.steps": 8, "checkpoint.interval": 1, "checkpoint.keep_last": 1}))
    err = capsys.readouterr().err
    assert code == EXIT_DIVERGED == 3
    assert "training diverged at step 4: the loss or gradient norm was non-finite for 3 consecutive steps (2-4" in err
    assert f"newest good checkpoint is {run / 'checkpoints' / 'step_0000001'}" in err
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000001", "step_0000003"]
    assert _state(ckpts / "step_0000001")["good"] is True
    assert _state(ckpts / "step_0000003")["good"] is False
    assert _state(ckpts / "step_0000003")["last_finite_step"] == 1
    # Resuming as it is warns that `latest` is not good and names the one to go back to.
    main(_args(run, tokenizer_dir, dataset_prefix, **{"optim.lr": 1e30, "train.steps": 8}))
    assert (f"resuming from {ckpts / 'step_0000003'}, which is not good (written after the last finite step); the "
            f"newest good checkpoint is {ckpts / 'step_0000001'}") in capsys.readouterr().err


def _cli_rank(rank, world, args, nan_from_step):
    """One rank of a CLI run in the harness's process group. With `nan_from_step`, this rank alone sees
    a NaN loss from that step on (the real update still runs on every rank): only the step-boundary
    agreement can make the other rank stop with it."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if nan_from_step:
        import scaletrain.trainer.loop as loop

        real, calls = loop.train_step, []

        def poisoned(*a, **k):
            result = real(*a, **k)
            calls.append(1)
            if len(calls) >= nan_from_step:
                result.loss = float("nan")
            return result
        loop.train_step = poisoned
    return main(args)


@pytest.mark.parametrize("layout,nan_rank", [("pp2", None), ("dp2", 1)])
def test_every_rank_stops_together(tmp_path, tokenizer_dir, dataset_prefix, layout, nan_rank):
    """pp2: the loss exists on the last stage only and reaches the first through the reduction; dp2: one
    rank alone sees non-finite losses. Every rank exits 3 at the same step; none hangs."""
    run = tmp_path / "run"
    extra = {"parallel.pp": 2} if layout == "pp2" else {}
    extra.update({"optim.lr": 1e30} if nan_rank is None else {})
    args = _args(run, tokenizer_dir, dataset_prefix, **{"train.steps": 10, "checkpoint.interval": 2, **extra})
    codes = run_ranks(2, _cli_rank_with, args, nan_rank, timeout=120)
    assert codes == [EXIT_DIVERGED, EXIT_DIVERGED]
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == ([1, 2, 3, 4] if nan_rank is None else [1, 2, 3, 4, 5])
    if nan_rank is not None:  # rank 0 logs: its own losses were finite all along
        assert all(r["loss"] == r["loss"] for r in read_metrics(run))
        assert _state(run / "checkpoints" / "step_0000004")["good"] is False  # rank 1's NaN, agreed


def _cli_rank_with(rank, world, args, nan_rank):
    return _cli_rank(rank, world, args, 3 if rank == nan_rank else 0)


def _spike_at(monkeypatch, step: int, factor: float = 1000.0) -> None:
    """Scale the output head by `factor` just before step `step`: a real loss spike of the real model."""
    import scaletrain.trainer.loop as loop

    real, calls = loop.train_step, []

    def spiking(model, *a, **k):
        calls.append(1)
        if len(calls) == step:
            with torch.no_grad():
                dict(model.named_parameters())["head.weight"].mul_(factor)
        return real(model, *a, **k)
    monkeypatch.setattr(loop, "train_step", spiking)


SPIKE = {"train.loss_spike_factor": 2.0, "train.loss_spike_window": 4, "checkpoint.interval": 2,
         "checkpoint.keep_last": 0}


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_a_loss_spike_is_logged_and_can_stop_the_run(tmp_path, tokenizer_dir, dataset_prefix, monkeypatch, capsys,
                                                    action):
    run = tmp_path / "run"
    _spike_at(monkeypatch, 8)
    code = main(_args(run, tokenizer_dir, dataset_prefix, **SPIKE, **{"train.loss_spike_action": action}))
    out = capsys.readouterr()
    records = read_metrics(run)
    assert records[7]["loss_spike"] is True and not any(r.get("loss_spike") for r in records[:7])
    assert "step 8: loss spike: " in out.out + out.err
    if action == "warn":
        assert code == 0 and len(records) == 12
    else:
        assert code == EXIT_DIVERGED and len(records) == 8
        assert "stopped (train.loss_spike_action = 'stop')" in out.err
        assert not (run / "checkpoints" / "step_0000008").exists()  # the spiked state is not saved
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000006"


def _spiking_rank(rank, world, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    _spike_at(pytest.MonkeyPatch(), 8)  # every rank scales its shard of the head: the whole head
    return main(args)


@pytest.mark.parametrize("layout", ["single", "tp2"])
def test_a_loss_spike_rolls_back_to_the_newest_good_checkpoint(tmp_path, tokenizer_dir, dataset_prefix, monkeypatch,
                                                              capsys, layout):
    """The rollback restores the step-6 weights and optimizer state exactly (the step-8 checkpoint, saved
    right after it, holds them) and training goes on from there at its old loss level; under tp2 every
    rank loads its shards of the same checkpoint."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    args = _args(run, tokenizer_dir, dataset_prefix, **SPIKE, **{"train.loss_spike_action": "rollback"},
                 **({"parallel.tp": 2} if layout == "tp2" else {}))
    if layout == "single":
        _spike_at(monkeypatch, 8)
        assert main(args) == 0
        assert f"rolled weights and optimizer back to {run / 'checkpoints' / 'step_0000006'}" in capsys.readouterr().out
    else:
        assert run_ranks(2, _spiking_rank, args, timeout=120) == [0, 0]
    losses = [r["loss"] for r in read_metrics(run)]
    assert losses[7] > 20 and max(losses[8:]) < 1.1 * max(losses[:7])
    six, eight = (run / "checkpoints" / "step_0000006"), (run / "checkpoints" / "step_0000008")
    files = sorted(p.name for p in six.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in eight.glob("*.safetensors"))
    for name in files:
        a, b = load_file(str(six / name)), load_file(str(eight / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_spike_with_no_good_checkpoint_before_it_stops(tmp_path, tokenizer_dir, dataset_prefix, monkeypatch, capsys):
    _spike_at(monkeypatch, 6)
    code = main(_args(tmp_path / "run", tokenizer_dir, dataset_prefix, **{
        **SPIKE, "checkpoint.interval": 0, "train.loss_spike_action": "rollback"}))
    assert code == EXIT_DIVERGED
    assert "cannot roll back: no good checkpoint before it" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("optim.lr=inf", "optim.lr = inf is not a finite number"),
    ("optim.lr=nan", "optim.lr = nan must be a positive learning rate"),
    ("optim.lr=0.0", "optim.lr = 0.0 must be a positive learning rate"),
    ("optim.lr=-1e-3", "optim.lr = -0.001 must be a positive learning rate"),
    ("optim.min_lr=nan", "optim.min_lr = nan is not a finite number"),
    ("optim.clip_grad=inf", "optim.clip_grad = inf is not a finite number"),
    ("optim.clip_grad=nan", "optim.clip_grad = nan must be a positive global gradient norm"),
    ("optim.beta2=-inf", "optim.beta2 = -inf is not a finite number"),
    ("posttrain.ppo.critic_lr=inf", "posttrain.ppo.critic_lr = inf is not a finite number"),
    ("train.max_nonfinite_steps=-1", "train.max_nonfinite_steps = -1 must be 0"),
    ("train.loss_spike_factor=0.5", "train.loss_spike_factor = 0.5 must be 0 (off) or above 1"),
    ("train.loss_spike_action=retry", "train.loss_spike_action = 'retry' is not one of warn, stop, rollback"),
])
def test_non_finite_and_non_positive_rates_and_clips_are_refused(override, message):
    cfg = load_config(TINY, ["data.prefixes=[]", "posttrain.objective=sft", 'posttrain.chat.train_data=["x.jsonl"]',
                             override])
    import dataclasses

    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model, tokenizer_vocab=2048, tp=1, seq_length=128))
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert message in str(e.value)


def test_a_bad_learning_rate_fails_on_the_command_line_before_any_work(tmp_path, tokenizer_dir, dataset_prefix,
                                                                        capsys):
    run = tmp_path / "run"
    assert main(_args(run, tokenizer_dir, dataset_prefix, **{"optim.lr": "inf"})) == 2
    assert "optim.lr = inf is not a finite number" in capsys.readouterr().err
    assert not run.exists()


def test_weights_finite_is_exact_for_huge_and_non_finite_weights():
    from scaletrain.trainer.divergence import weights_finite

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    cpu = torch.device("cpu")
    assert weights_finite(model, Comm.single("world"), cpu)
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite, but any sum of it overflows: the exact check decides
    assert weights_finite(model, Comm.single("world"), cpu)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with torch.no_grad():
            model[1].bias[1] = bad
        assert not weights_finite(model, Comm.single("world"), cpu)
