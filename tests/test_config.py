"""Strict config loading, overrides, inheritance and up-front validation."""

from __future__ import annotations

import dataclasses

import pytest

from scaletrain.config import ConfigError, dump_config, load_config, resolve_model, validate
from scaletrain.config.load import load_tree
from scaletrain.prepare import check_config

from conftest import TINY

pytestmark = pytest.mark.unit


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_tiny_config_loads_typed_and_frozen():
    cfg = load_config(TINY)
    assert cfg.model.hidden_size == 64 and cfg.train.steps == 300
    assert cfg.data.prefixes == ("data/kjv_text_document",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = _write(tmp_path, "run.toml", "[train]\nstpes = 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.stpes" in msg and str(p) in msg and "steps" in msg


def test_unknown_section_and_override_key():
    with pytest.raises(ConfigError, match=r"unknown section \[trian\].*train"):
        load_config(None, ["trian.steps=3"])
    with pytest.raises(ConfigError, match="parallel.tpp.*'tp'"):
        load_config(TINY, ["parallel.tpp=2"])


def test_wrong_type_is_an_error_naming_the_origin(tmp_path):
    p = _write(tmp_path, "run.toml", '[train]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match=r"run.toml: train.steps: expected an integer"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"--set: parallel.sequence_parallel: expected true or false"):
        load_config(TINY, ["parallel.sequence_parallel=yes"])


def test_overrides_parse_toml_literals_and_bare_strings():
    cfg = load_config(TINY, ["parallel.tp=2", "train.run_dir=runs/x", "optim.lr=1e-4",
                             'data.prefixes=["a", "b"]', "data.weights=[1, 3]", "parallel.sequence_parallel=true"])
    assert cfg.parallel.tp == 2 and cfg.train.run_dir == "runs/x" and cfg.optim.lr == 1e-4
    assert cfg.data.prefixes == ("a", "b") and cfg.data.weights == (1.0, 3.0) and cfg.parallel.sequence_parallel


def test_one_level_of_base(tmp_path):
    _write(tmp_path, "base.toml", "[train]\nsteps = 7\nseed = 3\n[model]\nnum_layers = 6\n")
    child = _write(tmp_path, "child.toml", 'base = "base.toml"\n[train]\nsteps = 9\n')
    cfg = load_config(child)
    assert (cfg.train.steps, cfg.train.seed, cfg.model.num_layers) == (9, 3, 6)
    _write(tmp_path, "grand.toml", 'base = "child.toml"\n')
    with pytest.raises(ConfigError, match="one level"):
        load_config(tmp_path / "grand.toml")
    _, origins = load_tree(child)
    assert origins[("train", "seed")].endswith("base.toml") and origins[("train", "steps")].endswith("child.toml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["train.steps=5"])
    dump_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg


def _resolved(overrides=(), vocab=2048):
    cfg = load_config(TINY, list(overrides))
    model = resolve_model(cfg.model, tokenizer_vocab=vocab, tp=cfg.parallel.tp, seq_length=cfg.train.seq_length)
    return dataclasses.replace(cfg, model=model)


def test_stage_independent_posttrain_rules_hold_for_every_stage():
    """Rules on the shared posttrain settings are checked whatever the stage (here: pretraining)."""
    with pytest.raises(ConfigError, match="posttrain.chat.tools: unknown tool.s. search; bundled: calculator"):
        check_config(_resolved(['posttrain.chat.tools=["search"]']), world_size=1)
    with pytest.raises(ConfigError, match="posttrain.objective = 'kto' is not one of pretrain, sft, dpo"):
        check_config(_resolved(["posttrain.objective=kto"]), world_size=1)


def test_derived_sizes():
    cfg = _resolved(["model.ffn_hidden_size=0", "model.hidden_size=4096", "model.num_heads=32",
                     "model.num_kv_heads=0"], vocab=32001)
    assert cfg.model.ffn_hidden_size == 11008  # Llama-2-7B's 8/3·4096 rounded to 256
    assert cfg.model.num_kv_heads == 32 and cfg.model.head_dim == 128
    assert cfg.model.vocab_size == 32128  # padded to a multiple of 128


def test_validate_returns_dp_and_reports_every_problem_with_the_fix():
    assert validate(_resolved(), world_size=1) == 1
    bad = _resolved(["model.num_heads=6", "model.num_kv_heads=4", "train.global_batch_size=10",
                     "train.micro_batch_size=4", "parallel.sequence_parallel=true", "optim.warmup_steps=1000"])
    with pytest.raises(ConfigError) as e:
        validate(bad, world_size=1)
    msg = str(e.value)
    assert "num_heads = 6 is not a multiple of model.num_kv_heads = 4" in msg
    assert "global_batch_size = 10 is not divisible by train.micro_batch_size·dp = 4·1" in msg
    assert "sequence_parallel = true needs parallel.tp > 1" in msg
    assert "warmup_steps = 1000 exceeds train.steps" in msg


def test_validate_world_size_and_layout_rules():
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tp·pp·cp"):
        validate(_resolved(["parallel.tp=2"]), world_size=3)
    with pytest.raises(ConfigError, match="num_layers = 4 is not divisible by parallel.pp·parallel.vpp = 3·1"):
        validate(_resolved(["parallel.pp=3"]), world_size=3)
    with pytest.raises(ConfigError, match="num_kv_heads = 2 is not divisible by parallel.tp = 4"):
        validate(_resolved(["parallel.tp=4"]), world_size=4)
    with pytest.raises(ConfigError, match="fp8 = true needs parallel.backend = 'te'"):
        validate(_resolved(["precision.fp8=true"]), world_size=1)


def test_layouts_not_built_yet_are_refused_not_faked():
    assert validate(_resolved(["parallel.tp=2"]), world_size=2) == 1
    assert validate(_resolved(), world_size=2) == 2
    assert validate(_resolved(["parallel.cp=2"]), world_size=4) == 2  # dp counts replicas: cp ranks share samples
    # rollouts are sampled on whole sequences by the cp ranks, then trained on split rows
    assert check_config(_resolved(["parallel.cp=2", "posttrain.objective=grpo", 'posttrain.chat.train_data=["p.jsonl"]',
                                   "posttrain.grpo.group_size=2"]), world_size=2) == 1
    assert validate(_resolved(["parallel.pp=2"]), world_size=2) == 1
    with pytest.raises(ConfigError, match=r"interleaved 1F1B \(parallel.vpp = 2\) needs the microbatches per step \(2\)"):
        validate(_resolved(["parallel.pp=4", "parallel.vpp=1", "parallel.vpp=2", "model.num_layers=8"]), world_size=4)
    assert validate(_resolved(["optim.distributed=true"]), world_size=2) == 2


@pytest.mark.parametrize("name", ["llama3_1b", "llama3_3b", "llama3_8b", "llama3_70b", "llama3_405b", "llama3_8b_long"])
def test_published_shapes_load(name):
    from conftest import REPO

    cfg = load_config(REPO / "configs" / f"{name}.toml")
    assert cfg.model.vocab_size == 128256 and cfg.model.rope_scaling == "llama3"
