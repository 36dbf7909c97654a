"""Checkpoint atomicity, integrity checks and pickle-free loading."""

from __future__ import annotations

import os

import pytest
import torch

from scaletrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from scaletrain.checkpoint import save as ckpt_save
from scaletrain.config.schema import ModelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.distributed import ParallelDims
from scaletrain.models import build_model
from scaletrain.nn import init_parameters

pytestmark = pytest.mark.unit


def _model(hidden=32, seed=0):
    cfg = resolve_model(ModelConfig(vocab_size=64, hidden_size=hidden, num_layers=1, num_heads=2,
                                    ffn_hidden_size=48), tokenizer_vocab=None, tp=1, seq_length=16)
    m = build_model(cfg)
    init_parameters(m, seed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randint(0, 64, (2, 8))).sum().backward()
    opt.step()
    return m, opt


def test_round_trip_restores_model_and_optimizer(tmp_path):
    m, opt = _model(seed=1)
    save_checkpoint(tmp_path, 3, m, opt, {"consumed_samples": 12, "rng": {}}, dims=ParallelDims.single())
    m2, opt2 = _model(seed=2)
    state = load_checkpoint(latest_checkpoint(tmp_path), m2, opt2, dims=ParallelDims.single())
    assert state["step"] == 3 and state["consumed_samples"] == 12
    for (n, a), b in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][k], opt2.state[b][k])


def test_crash_during_save_keeps_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    m, opt = _model()
    save_checkpoint(tmp_path, 1, m, opt, {"consumed_samples": 4, "rng": {}}, dims=ParallelDims.single())
    real_replace = os.replace

    def crash_on_publish(src, dst):
        if str(dst).endswith("step_0000002"):
            raise OSError("simulated crash while publishing the checkpoint")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_save.os, "replace", crash_on_publish)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, m, opt, {"consumed_samples": 8, "rng": {}}, dims=ParallelDims.single())
    monkeypatch.setattr(ckpt_save.os, "replace", real_replace)
    assert latest_checkpoint(tmp_path).name == "step_0000001"
    assert load_checkpoint(latest_checkpoint(tmp_path), *_model(), dims=ParallelDims.single())["consumed_samples"] == 4


def test_corrupt_or_mismatched_checkpoints_fail_clearly(tmp_path):
    m, opt = _model()
    path = save_checkpoint(tmp_path, 1, m, opt, {"consumed_samples": 4, "rng": {}}, dims=ParallelDims.single())
    with pytest.raises(CheckpointError, match="(?s)does not fit.*shape/dtype mismatch: model.embed.weight"):
        load_checkpoint(path, *_model(hidden=16), dims=ParallelDims.single())
    shard = next(path.glob("*.safetensors"))
    shard.write_bytes(b"\x00garbage" + shard.read_bytes()[20:])
    with pytest.raises(CheckpointError, match="cannot be read.*corrupt"):
        load_checkpoint(path, *_model(), dims=ParallelDims.single())
    (path / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        latest_checkpoint(tmp_path)


def test_checkpoints_hold_no_pickle(tmp_path):
    m, opt = _model()
    path = save_checkpoint(tmp_path, 1, m, opt, {"consumed_samples": 0, "rng": {}}, dims=ParallelDims.single())
    for f in path.iterdir():
        assert f.suffix in (".safetensors", ".json"), f
        assert b"\x80\x04\x95" not in f.read_bytes()[:64]  # pickle protocol-4 header
