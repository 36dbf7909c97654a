"""A run directory written before issue 24 §3 — its config.toml with the flat `[posttrain]` keys of main at
15dd4a4 — still exports with its chat template (`scaletrain convert to-hf` reads the run's config.toml) and
still resumes (`--config RUN_DIR/config.toml`) to the steps of the uninterrupted run; the resumed start writes
config.toml back with the new keys."""

from __future__ import annotations

import json

import pytest
import tomli_w
import tomllib

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.cli import main
from scaletrain.config import renamed
from scaletrain.data.tokenizer import load_tokenizer

from conftest import TINY, read_metrics, tiny_overrides

pytestmark = pytest.mark.e2e

# main's [posttrain] as its runs dumped it (every flat key, at main's defaults)
OLD_POSTTRAIN = {
    "objective": "pretrain", "train_data": [], "valid_data": [], "chat_template": "auto", "tools": [],
    "loss_on": "assistant", "packing": True, "over_length": "drop", "dpo_loss": "sigmoid", "beta": 0.1,
    "label_smoothing": 0.0, "simpo_gamma": 0.5, "nll_weight": 0.0, "reward_margin": 0.0, "reward_center": 0.0,
    "rewards": ["math_answer"], "reward_weights": [], "sandbox": "bwrap", "sandbox_timeout_s": 5.0,
    "sandbox_memory_mb": 1024, "sandbox_processes": 32, "sandbox_disk_mb": 64, "sandbox_workers": 0,
    "sandbox_python": "", "missing_stop_penalty": 0.0, "reward_model": "", "group_size": 8, "max_new_tokens": 32,
    "rollout_micro_batch": 0, "temperature": 1.0, "kl_beta": 0.0, "scale_rewards": True, "grpo_iterations": 1,
    "clip_eps": 0.2, "clip_eps_high": 0.0, "grpo_loss_norm": "token", "dynamic_sampling": False,
    "max_sampling_rounds": 3, "overlong_buffer": 0, "overlong_penalty": 1.0, "mask_truncated": False, "critic": "",
    "critic_lr": 0.0, "gae_gamma": 1.0, "gae_lambda": 0.95, "value_clip": 0.2, "whiten_advantages": True,
    "teacher": "", "distill_loss": "forward_kl", "distill_temperature": 1.0, "distill_alpha": 1.0, "distill_top_k": 0,
    "distill_on_policy": False,
}


def _sft(run_dir, tokenizer_dir, prefix, data, **extra) -> list[str]:
    args = ["sft", "--config", TINY]
    for s in tiny_overrides(run_dir, tokenizer_dir, prefix, **{
            "posttrain.chat.train_data": f'["{data}"]', "posttrain.chat.template": "llama3",
            "posttrain.sft.packing": False, "train.seq_length": 256, "train.steps": 4, "checkpoint.interval": 2,
            "precision.dtype": "float64", **extra}):
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(out), "--train", "16", "--test", "2"]) == 0
    return out / "sft_train.jsonl"


def test_an_old_style_run_directory_exports_and_resumes(tmp_path, tokenizer_dir, dataset_prefix, sft_rows,
                                                        monkeypatch, capsys):
    monkeypatch.setattr(renamed, "_announced", set())
    full, run = tmp_path / "full", tmp_path / "run"
    assert main(_sft(full, tokenizer_dir, dataset_prefix, sft_rows)) == 0
    assert main(_sft(run, tokenizer_dir, dataset_prefix, sft_rows, **{"train.exit_interval": 2})) == 0
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2]

    # the run directory as main wrote it: [posttrain] flat, with this run's data and template
    saved = tomllib.loads((run / "config.toml").read_text())
    saved["posttrain"] = {**OLD_POSTTRAIN, "objective": "sft", "train_data": [str(sft_rows)],
                          "chat_template": "llama3", "packing": False}
    (run / "config.toml").write_text(tomli_w.dumps(saved))
    capsys.readouterr()

    out = tmp_path / "hf"
    assert main(["convert", "to-hf", str(run / "checkpoints"), str(out)]) == 0
    exported = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert exported == ChatRenderer(load_tokenizer(str(tokenizer_dir)), "llama3").source != \
        ChatRenderer(load_tokenizer(str(tokenizer_dir)), "auto").source
    err = capsys.readouterr().err
    assert "posttrain.chat_template is renamed posttrain.chat.template" in err, err

    assert main(["sft", "--config", str(run / "config.toml")]) == 0  # resumes at step 2
    steps = {m["step"]: m for m in read_metrics(run) if "loss" in m}
    want = {m["step"]: m for m in read_metrics(full) if "loss" in m}
    assert sorted(steps) == [1, 2, 3, 4]
    for step in (3, 4):
        assert steps[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-12, abs=0), step
    rewritten = tomllib.loads((run / "config.toml").read_text())["posttrain"]
    assert rewritten["chat"]["template"] == "llama3" and "chat_template" not in rewritten
