"""DAPO's additions to GRPO: dynamic sampling (drop groups with equal rewards, sample more), the soft
overlong punishment and overlong filtering — by hand, through the CLI, at dp2 against the single
process, and across a resume. (Clip-higher and the token-level loss are in test_grpo.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from scaletrain.cli import main
from scaletrain.stages.rl.dynamic_sampling import choose_groups, informative_groups
from scaletrain.stages.rl.grpo import overlong_penalty

from conftest import TINY, grpo_args, read_metrics, tiny_overrides
from parity import assert_same_steps, run_single_and_parallel

pytestmark = pytest.mark.e2e

# 4 groups of 4 per step; about half the prompts have odd answers, whose groups are all 0.
DYNAMIC = {"posttrain.rewards.functions": '["grpo_rewards:varied_or_flat"]', "train.global_batch_size": 16,
           "train.micro_batch_size": 4, "posttrain.grpo.dynamic_sampling": True, "posttrain.grpo.max_sampling_rounds": 4}


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([0, 10, 12, 13, 16])
    # max 16, buffer 4: free up to 12 tokens, then −factor·(L − 12)/4.
    assert overlong_penalty(lengths, 16, 4, 2.0).tolist() == [0.0, 0.0, 0.0, -0.5, -2.0]
    assert overlong_penalty(lengths, 16, 0, 2.0).tolist() == [0.0] * 5


def test_informative_groups_are_chosen_first_then_fillers_in_order():
    total = torch.tensor([1., 1., 0., 1., 2., 2., 0., 0., 3., 4.])  # groups of 2: flat, varied, flat, flat, varied
    informative = informative_groups(total, 2)
    assert informative.tolist() == [False, True, False, False, True]
    assert choose_groups(informative, 2) == ([1, 4], 0)
    assert choose_groups(informative, 4) == ([1, 4, 0, 2], 2)


def test_dynamic_sampling_trains_on_informative_groups_only(tmp_path, tokenizer_dir, dataset_prefix, prompts):
    plain, dynamic = tmp_path / "plain", tmp_path / "dynamic"
    assert main(grpo_args(plain, tokenizer_dir, dataset_prefix, prompts,
                      **{**DYNAMIC, "posttrain.grpo.dynamic_sampling": False, "train.steps": 4})) == 0
    assert main(grpo_args(dynamic, tokenizer_dir, dataset_prefix, prompts, **{**DYNAMIC, "train.steps": 4})) == 0
    without, with_ = read_metrics(plain), read_metrics(dynamic)
    assert sum(m["zero_std_groups"] for m in without) > 0  # the flat prompts do reach the batch
    for m in with_:
        assert m["zero_std_groups"] == 0 and m["filled_groups"] == 0, m
        assert 1 <= m["sampling_rounds"] <= 4 and 0 <= m["filtered_groups"] < 1
    assert max(m["sampling_rounds"] for m in with_) >= 2 and max(m["filtered_groups"] for m in with_) > 0
    # One round that finds every group flat, with no rounds left: the batch is filled and says so.
    flat = tmp_path / "flat"
    assert main(grpo_args(flat, tokenizer_dir, dataset_prefix, prompts, **{
        **DYNAMIC, "posttrain.grpo.max_sampling_rounds": 1,
        "train.steps": 4})) == 0
    filled = read_metrics(flat)
    assert all(m["filled_groups"] == m["zero_std_groups"] == m["filtered_groups"] for m in filled)
    assert any(m["filled_groups"] > 0 for m in filled)
    # ...and it is the plain run's batch (round 0 is the run's own prompt order), informative groups first.
    assert [m["loss"] for m in filled] == pytest.approx([m["loss"] for m in without], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("layout,world", [({}, 2), ({"parallel.cp": 2, "posttrain.grpo.iterations": 2}, 2),
                                          ({"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}, 4)],
                         ids=["dp2", "cp2", "tp2pp2sp"])
def test_dynamic_sampling_matches_the_single_process(tmp_path, tokenizer_dir, dataset_prefix, prompts,
                                                    layout, world):
    """The choice is global: dp2 keeps the groups the single process keeps (with the overlong punishment
    and filtering on as well, which change rewards and loss masks); within a replica (cp, tp, pp, and
    two updates per batch) every rank holds the same pool."""
    extra = {**DYNAMIC, "posttrain.rewards.overlong_buffer": 3, "posttrain.grpo.mask_truncated": True}
    a, b = run_single_and_parallel(
        lambda par: (tmp_path / str(par), grpo_args(tmp_path / str(par), tokenizer_dir, dataset_prefix, prompts, **extra,
                                                **{k: v for k, v in layout.items() if par or k.startswith("posttrain")})),
        world)
    assert_same_steps(a, b, 1e-10)
    for x, y in zip(a, b):
        for k in ("reward", "zero_std_groups", "sampling_rounds", "filtered_groups", "loss_tokens", "truncated"):
            assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), (x["step"], k)
    logs = [[json.loads(line) for line in (tmp_path / d / "rollouts.jsonl").read_text().splitlines()]
            for d in ("False", "True")]
    assert [r["completions"] for r in logs[0]] == [r["completions"] for r in logs[1]]
    assert max(x["sampling_rounds"] for x in a) >= 2


def test_overlong_punishment_and_filtering_through_the_cli(tmp_path, tokenizer_dir, dataset_prefix, prompts):
    """buffer = max_new_tokens (6): every token costs factor/6, so the mean reward is the digit reward
    minus factor·completion_tokens/6; filtering leaves loss only on completions that ended (a cut one
    is exactly 6 tokens long)."""
    run = tmp_path / "run"
    assert main(grpo_args(run, tokenizer_dir, dataset_prefix, prompts, **{
        "train.steps": 2, "posttrain.grpo.beta": 0.0, "posttrain.rewards.overlong_buffer": 6, "posttrain.rewards.overlong_penalty": 0.5,
        "posttrain.grpo.mask_truncated": True, "posttrain.rollout.max_new_tokens": 6})) == 0
    n = 8  # completions per step
    for m in read_metrics(run):
        assert m["reward"] == pytest.approx(m["reward_digits"] - 0.5 * m["completion_tokens"] / 6, abs=1e-12)
        assert m["loss_tokens"] == round(n * m["completion_tokens"] - 6 * n * m["truncated"])


def test_dynamic_sampling_resumes_exactly(tmp_path, tokenizer_dir, dataset_prefix, prompts):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    extra = {**DYNAMIC, "train.steps": 4}
    assert main(grpo_args(straight, tokenizer_dir, dataset_prefix, prompts, **extra)) == 0
    assert main(grpo_args(stopped, tokenizer_dir, dataset_prefix, prompts, **extra, **{"train.exit_interval": 2})) == 0
    assert main(grpo_args(stopped, tokenizer_dir, dataset_prefix, prompts, **extra)) == 0
    keys = ("loss", "grad_norm", "reward", "sampling_rounds", "filtered_groups")
    assert [[m[k] for k in keys] for m in read_metrics(stopped)] == [[m[k] for k in keys] for m in read_metrics(straight)]


@pytest.mark.parametrize("extra,message", [
    ({"posttrain.grpo.max_sampling_rounds": 0}, "posttrain.grpo.max_sampling_rounds = 0"),
    ({"posttrain.rewards.overlong_buffer": 7}, "posttrain.rewards.overlong_buffer = 7"),
    ({"posttrain.rewards.overlong_penalty": -1.0}, "posttrain.rewards.overlong_penalty = -1.0"),
])
def test_bad_dapo_settings_fail_before_training(tmp_path, tokenizer_dir, dataset_prefix, prompts, capsys,
                                               extra, message):
    assert main(grpo_args(tmp_path / "r", tokenizer_dir, dataset_prefix, prompts, **extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_ppo_refuses_grpo_only_settings(tmp_path, tokenizer_dir, dataset_prefix, prompts):
    from scaletrain.config import ConfigError, load_config
    from scaletrain.prepare import check_config

    cfg = load_config(TINY, tiny_overrides(tmp_path, tokenizer_dir, dataset_prefix, **{
        "posttrain.objective": "ppo", "posttrain.chat.train_data": f'["{prompts}"]', "posttrain.ppo.group_size": 1,
        "train.global_batch_size": 8, "train.micro_batch_size": 1, "train.seq_length": 96,
        "posttrain.rollout.max_new_tokens": 6, "posttrain.ppo.critic": "somewhere", "posttrain.grpo.dynamic_sampling": True}))
    with pytest.raises(ConfigError, match="dynamic_sampling and posttrain.grpo.mask_truncated are GRPO's .*'ppo' does "
                                          "not read them"):
        check_config(cfg, 1)
