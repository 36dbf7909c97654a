"""Every flat `posttrain.*` key of the run interface before issue 24 §3 (main at 15dd4a4) still loads: from a run
file, from `--set` and from a run directory's saved config.toml, at its new place, with one notice per key naming
the new key; an old key and its new key set to different values is an error.

The list below is frozen from that schema (name, default there, a test value, where it lives now) — it is the
promise, independent of scaletrain/config/renamed.py, which must cover exactly these keys."""

from __future__ import annotations

import dataclasses
import json

import pytest
import tomli_w

from scaletrain.config import ConfigError, dump_config, load_config, renamed

pytestmark = pytest.mark.unit

# (old key under [posttrain], its default on main at 15dd4a4, a test value, its new place(s) under [posttrain])
OLD_KEYS = [
    ("train_data", (), ['train_data_a', 'train_data_b'], ('chat.train_data',)),
    ("valid_data", (), ['valid_data_a', 'valid_data_b'], ('chat.valid_data',)),
    ("chat_template", 'auto', 'xauto', ('chat.template',)),
    ("tools", (), ['tools_a', 'tools_b'], ('chat.tools',)),
    ("loss_on", 'assistant', 'xassistant', ('sft.loss_on',)),
    ("packing", True, False, ('sft.packing',)),
    ("over_length", 'drop', 'xdrop', ('sft.over_length',)),
    ("dpo_loss", 'sigmoid', 'xsigmoid', ('dpo.loss_type',)),
    ("beta", 0.1, 0.35, ('dpo.beta',)),
    ("label_smoothing", 0.0, 0.25, ('dpo.label_smoothing',)),
    ("simpo_gamma", 0.5, 0.75, ('dpo.simpo_gamma',)),
    ("nll_weight", 0.0, 0.25, ('dpo.nll_weight',)),
    ("reward_margin", 0.0, 0.25, ('reward.margin',)),
    ("reward_center", 0.0, 0.25, ('reward.center_coefficient',)),
    ("rewards", ('math_answer',), ['rewards_a', 'rewards_b'], ('rewards.functions',)),
    ("reward_weights", (), [0.5, 2.0], ('rewards.weights',)),
    ("sandbox", 'bwrap', 'xbwrap', ('sandbox.backend',)),
    ("sandbox_timeout_s", 5.0, 5.25, ('sandbox.timeout_s',)),
    ("sandbox_memory_mb", 1024, 1027, ('sandbox.memory_mb',)),
    ("sandbox_processes", 32, 35, ('sandbox.processes',)),
    ("sandbox_disk_mb", 64, 67, ('sandbox.disk_mb',)),
    ("sandbox_workers", 0, 3, ('sandbox.workers',)),
    ("sandbox_python", '', 'x', ('sandbox.python',)),
    ("missing_stop_penalty", 0.0, 0.25, ('rewards.missing_stop_penalty',)),
    ("reward_model", '', 'x', ('rewards.model',)),
    ("group_size", 8, 11, ('grpo.group_size', 'ppo.group_size')),
    ("max_new_tokens", 32, 35, ('rollout.max_new_tokens',)),
    ("rollout_micro_batch", 0, 3, ('rollout.micro_batch',)),
    ("temperature", 1.0, 1.25, ('rollout.temperature',)),
    ("kl_beta", 0.0, 0.25, ('grpo.beta', 'ppo.kl_coef')),
    ("scale_rewards", True, False, ('grpo.scale_rewards',)),
    ("grpo_iterations", 1, 4, ('grpo.iterations', 'ppo.iterations')),
    ("clip_eps", 0.2, 0.45, ('grpo.clip_eps', 'ppo.clip_eps')),
    ("clip_eps_high", 0.0, 0.25, ('grpo.clip_eps_high', 'ppo.clip_eps_high')),
    ("grpo_loss_norm", 'token', 'xtoken', ('grpo.loss_norm',)),
    ("dynamic_sampling", False, True, ('grpo.dynamic_sampling',)),
    ("max_sampling_rounds", 3, 6, ('grpo.max_sampling_rounds',)),
    ("overlong_buffer", 0, 3, ('rewards.overlong_buffer',)),
    ("overlong_penalty", 1.0, 1.25, ('rewards.overlong_penalty',)),
    ("mask_truncated", False, True, ('grpo.mask_truncated',)),
    ("critic", '', 'x', ('ppo.critic',)),
    ("critic_lr", 0.0, 0.25, ('ppo.critic_lr',)),
    ("gae_gamma", 1.0, 1.25, ('ppo.gae_gamma',)),
    ("gae_lambda", 0.95, 1.2, ('ppo.gae_lambda',)),
    ("value_clip", 0.2, 0.45, ('ppo.value_clip',)),
    ("whiten_advantages", True, False, ('ppo.whiten_advantages',)),
    ("teacher", '', 'x', ('distill.teacher',)),
    ("distill_loss", 'forward_kl', 'xforward_kl', ('distill.loss',)),
    ("distill_temperature", 1.0, 1.25, ('distill.temperature',)),
    ("distill_alpha", 1.0, 1.25, ('distill.alpha',)),
    ("distill_top_k", 0, 3, ('distill.top_k',)),
    ("distill_on_policy", False, True, ('distill.on_policy',)),
]


def _at(cfg, path: str):
    node = cfg.posttrain
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _expected(value):
    return tuple(value) if isinstance(value, list) else value


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    """Each test sees the notices of its own loads (they are printed once per process)."""
    monkeypatch.setattr(renamed, "_announced", set())
    monkeypatch.delenv("RANK", raising=False)


def test_the_rename_table_covers_exactly_the_old_keys():
    assert len(OLD_KEYS) == 52
    assert sorted(renamed.RENAMED) == sorted(f"posttrain.{old}" for old, *_ in OLD_KEYS)


@pytest.mark.parametrize("old,default,value,new", OLD_KEYS, ids=[k[0] for k in OLD_KEYS])
def test_old_key_from_set_lands_at_its_new_key_with_one_notice(old, default, value, new, capsys):
    cfg = load_config(None, [f"posttrain.{old}={json.dumps(value)}"])
    for path in new:
        assert _at(cfg, path) == _expected(value), path
        assert _at(load_config(None), path) == _expected(default), f"{path}'s default changed"
    err = capsys.readouterr().err
    notice = [line for line in err.splitlines() if f"posttrain.{old} " in line]
    assert len(notice) == 1 and all(f"posttrain.{path}" in notice[0] for path in new), err
    load_config(None, [f"posttrain.{old}={json.dumps(value)}"])  # again in the same process: no second notice
    assert f"posttrain.{old} " not in capsys.readouterr().err


@pytest.mark.parametrize("old,default,value,new", OLD_KEYS, ids=[k[0] for k in OLD_KEYS])
def test_old_key_from_a_run_file_lands_at_its_new_key_and_is_dumped_under_it(old, default, value, new, tmp_path,
                                                                                capsys):
    path = tmp_path / "old.toml"
    path.write_text(tomli_w.dumps({"train": {"steps": 3}, "posttrain": {"objective": "sft", old: value}}))
    cfg = load_config(path)
    assert cfg.train.steps == 3 and cfg.posttrain.objective == "sft"
    for p in new:
        assert _at(cfg, p) == _expected(value), p
    assert f"posttrain.{old} is renamed" in capsys.readouterr().err
    dump_config(cfg, tmp_path / "config.toml")  # the resolved config carries the new key only
    text = (tmp_path / "config.toml").read_text()
    assert f"\n{old} =" not in text or old in {n.split(".")[-1] for n in new}
    assert load_config(tmp_path / "config.toml") == cfg
    assert capsys.readouterr().err == ""


def test_the_notice_is_printed_on_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert load_config(None, ["posttrain.kl_beta=0.2"]).posttrain.grpo.beta == 0.2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    load_config(None, ["posttrain.kl_beta=0.2"])
    assert capsys.readouterr().err.strip() == ("config: posttrain.kl_beta is renamed posttrain.grpo.beta and "
                                              "posttrain.ppo.kl_coef; it still works for now, please use the new key.")


def test_old_and_new_key_with_different_values_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"posttrain.kl_beta=0.1 .*posttrain.grpo.beta"):
        load_config(None, ["posttrain.grpo.beta=0.2", "posttrain.kl_beta=0.1"])
    with pytest.raises(ConfigError, match=r"posttrain.grpo_iterations.*posttrain.ppo.iterations"):
        load_config(None, ["posttrain.grpo_iterations=3", "posttrain.ppo.iterations=2"])
    path = tmp_path / "both.toml"
    path.write_text('[posttrain]\nchat_template = "chatml"\n[posttrain.chat]\ntemplate = "llama3"\n')
    with pytest.raises(ConfigError, match=r"both.toml: posttrain.chat_template = 'chatml' and posttrain.chat.template "
                                          r"= 'llama3' set the same thing.*keep only posttrain.chat.template"):
        load_config(path)
    # the same value twice is no conflict; and a later file or --set overrides an earlier one as always
    assert load_config(None, ["posttrain.kl_beta=0.1", "posttrain.grpo.beta=0.1"]).posttrain.ppo.kl_coef == 0.1
    path.write_text('[posttrain]\nchat_template = "chatml"\n')
    assert load_config(path, ["posttrain.chat.template=llama3"]).posttrain.chat.template == "llama3"
    child = tmp_path / "child.toml"
    child.write_text('base = "both.toml"\n[posttrain.chat]\ntemplate = "llama3"\n')
    assert load_config(child).posttrain.chat.template == "llama3"


def test_rewards_and_sandbox_are_old_keys_as_values_and_new_sections_as_tables(tmp_path):
    """`posttrain.rewards` and `posttrain.sandbox` name both an old key and a new section."""
    cfg = load_config(None, ['posttrain.rewards=["answer_format"]', "posttrain.rewards.weights=[2.0]",
                             "posttrain.sandbox=none", "posttrain.sandbox.workers=2"])
    assert cfg.posttrain.rewards.functions == ("answer_format",) and cfg.posttrain.rewards.weights == (2.0,)
    assert (cfg.posttrain.sandbox.backend, cfg.posttrain.sandbox.workers) == ("none", 2)
    path = tmp_path / "new.toml"
    path.write_text('[posttrain.rewards]\nfunctions = ["python_tests"]\n[posttrain.sandbox]\nbackend = "none"\n')
    cfg = load_config(path)
    assert cfg.posttrain.rewards.functions == ("python_tests",) and cfg.posttrain.sandbox.backend == "none"


def test_unknown_keys_still_fail_with_the_closest_key():
    with pytest.raises(ConfigError, match=r"unknown key 'posttrain.grpo.bta'. Did you mean 'posttrain.grpo.beta'\?"):
        load_config(None, ["posttrain.grpo.bta=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'posttrain.chat_templat'. Did you mean 'posttrain.chat.template'"):
        load_config(None, ["posttrain.chat_templat=chatml"])
    with pytest.raises(ConfigError, match=r"unknown key 'posttrain.kl_bta'. Did you mean 'posttrain.grpo.beta'"):
        load_config(None, ["posttrain.kl_bta=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'posttrain.ppo.gamma'. Did you mean 'posttrain.ppo.gae_gamma'"):
        load_config(None, ["posttrain.ppo.gamma=0.9"])
    with pytest.raises(ConfigError, match=r"--set 'posttrain.grpo.beta.x=1': the key must be section.key"):
        load_config(None, ["posttrain.grpo.beta.x=1"])


def test_every_new_key_has_its_old_keys_value_type():
    """A value valid for the old key is valid for its new one: same types, so scripts keep their values."""
    for old, default, _, new in OLD_KEYS:
        for path in new:
            assert type(_at(load_config(None), path)) is type(default), (old, path)
    assert dataclasses.is_dataclass(load_config(None).posttrain.grpo)
