"""A mixture-of-experts model through the real entry points: pretraining on the bundled corpus balances its
experts (configs/tiny_moe.toml; the CV of tokens per expert is reported per step), and the post-training
stages run it through the same builder and step — SFT, DPO and reward models at ep2, GRPO and PPO (rollouts
decoded through the MoE blocks; PPO with a MoE critic) at tp2·SP and at ep2 (the ep ranks decode in lock step), and distillation from a MoE teacher into a dense student at tp2·SP equal one
process (float64, 1e-10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.cli import main

from conftest import REPO, TINY, grpo_args, read_metrics, tiny_overrides
from dist_harness import cli_rank, run_ranks
from parity import assert_same_steps, run_single_and_parallel

pytestmark = pytest.mark.e2e

TINY_MOE = str(REPO / "configs" / "tiny_moe.toml")
MOE = {"model.moe.num_experts": 4, "model.moe.top_k": 2, "model.moe.expert_ffn_hidden_size": 32,
       "model.moe.shared_ffn_hidden_size": 32, "model.moe.z_loss_coef": 0.001}


def _pretrain(run: Path, tokenizer_dir, prefix, **extra) -> list[dict]:
    args = ["train", "--config", TINY_MOE]
    for key, value in {"train.run_dir": run, "data.tokenizer": tokenizer_dir, "data.prefixes": f'["{prefix}"]',
                       "train.steps": 30, "optim.warmup_steps": 5, "train.eval_interval": 0,
                       "checkpoint.interval": 0, "logging.tensorboard": "false", **extra}.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    return read_metrics(run)


def _late_cv(steps: list[dict]) -> float:
    """Mean CV of tokens per expert over the last 5 steps (one step's CV is noisy)."""
    return sum(s["moe_expert_tokens_cv"] for s in steps[-5:]) / 5


@pytest.mark.slow
def test_tiny_moe_pretrains_with_balanced_experts(tmp_path, tokenizer_dir, dataset_prefix):
    """configs/tiny_moe.toml learns (loss falls), and both balancing methods — the aux loss, and DeepSeek-V3's
    bias updates alone (sigmoid scores, no aux loss) — end with a CV of tokens per expert far below the same
    run's without any balancing (~1.4 here: a few experts take most tokens)."""
    balanced = _pretrain(tmp_path / "aux", tokenizer_dir, dataset_prefix)
    free = _pretrain(tmp_path / "none", tokenizer_dir, dataset_prefix, **{"model.moe.aux_loss_coef": 0})
    biased = _pretrain(tmp_path / "bias", tokenizer_dir, dataset_prefix, **{
        "model.moe.aux_loss_coef": 0, "model.moe.score_fn": "sigmoid", "model.moe.bias_update_rate": 0.01})
    assert balanced[-1]["loss"] < balanced[0]["loss"] - 1.0
    for key in ("moe_aux_loss", "moe_z_loss", "moe_expert_tokens_min", "moe_expert_tokens_max",
                "moe_expert_tokens_cv", "moe_dropped_fraction"):
        assert key in balanced[-1], key
    cv, cv_free, cv_bias = _late_cv(balanced), _late_cv(free), _late_cv(biased)
    assert cv < 0.5 and cv < cv_free / 2 and cv_bias < 0.75 * cv_free, (cv, cv_free, cv_bias)
    assert free[-1]["moe_aux_loss"] == 0 and balanced[-1]["moe_aux_loss"] > 0


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(out), "--train", "24", "--test", "4"]) == 0
    return out


def _stage_args(stage, run_dir, tokenizer_dir, prefix, data_file, **extra):
    args = [stage, "--config", TINY]
    for s in tiny_overrides(run_dir, tokenizer_dir, prefix, **{
            "posttrain.chat.train_data": f'["{data_file}"]', "train.seq_length": 160, "train.global_batch_size": 4,
            "train.micro_batch_size": 1, "train.steps": 3, "precision.dtype": "float64", **MOE, **extra}):
        args += ["--set", s]
    return args


@pytest.mark.parametrize("stage,data", [("sft", "sft_train.jsonl"), ("dpo", "dpo_train.jsonl"),
                                        ("reward", "dpo_train.jsonl")])
def test_post_training_stages_run_moe_at_ep2_like_one_process(tmp_path, tokenizer_dir, dataset_prefix, synth,
                                                              stage, data):
    a, b = run_single_and_parallel(
        lambda par: (tmp_path / str(par), _stage_args(stage, tmp_path / str(par), tokenizer_dir, dataset_prefix,
                                                      synth / data, **({"parallel.ep": 2} if par else {}))), 2)
    assert len(a) == 3 and "moe_expert_tokens_cv" in a[-1]
    assert_same_steps(a, b, 1e-10)


def test_grpo_rollouts_decode_through_moe_blocks_at_tp2_sp_and_ep2_like_one_process(tmp_path, tokenizer_dir,
                                                                                     dataset_prefix, prompts):
    """GRPO samples its rollouts with the KV cache through the MoE blocks (dropless) and trains on them; at tp2
    with SP, and at ep2 (over dp2: each replica decodes its own groups, the ep ranks in lock step,
    generation/ep_lockstep.py), the steps and the held-out rewards equal one process's."""
    # 5 held-out prompts at step 3: uneven over dp2 (2 microbatches on one replica, 1 on the other)
    valid = {"posttrain.chat.valid_data": f'["{prompts.with_name("sft_test.jsonl")}"]', "train.eval_interval": 3}

    def args(run: str, **par):
        return tmp_path / run, grpo_args(tmp_path / run, tokenizer_dir, dataset_prefix, prompts, **MOE, **valid, **par)

    a, b = run_single_and_parallel(lambda par: args("tp", **{"parallel.tp": 2, "parallel.sequence_parallel": True})
                                   if par else args("one"), 2)
    run, ep_args = args("ep", **{"parallel.ep": 2})
    assert run_ranks(2, cli_rank, ep_args, timeout=240) == [0, 0]
    c = read_metrics(run)
    assert len(a) == 3 and all(x["completion_tokens"] > 0 and "moe_expert_tokens_cv" in x for x in a)
    for other in (b, c):
        assert_same_steps(a, other, 1e-10)
        for x, y in zip(a, other):
            assert x["reward"] == pytest.approx(y["reward"], rel=1e-9, abs=1e-12)
            assert x["completion_tokens"] == y["completion_tokens"]
        for k in ("val_reward", "val_completion_tokens"):
            assert a[2][k] == pytest.approx(other[2][k], rel=1e-12, abs=1e-15), k


def test_ep2_sampling_is_refused_where_not_lock_stepped(tmp_path, tokenizer_dir, dataset_prefix, prompts, capsys):
    """Expert-parallel decoding is proven at pp = cp = 1 without eval tasks: the rest is refused up front."""
    for extra in ({"parallel.pp": 2}, {"train.eval_tasks": '["arith"]', "train.eval_interval": 1}):
        capsys.readouterr()
        assert main(grpo_args(tmp_path / "ep", tokenizer_dir, dataset_prefix, prompts, **MOE,
                              **{"parallel.ep": 2, **extra})) == 2
        assert "parallel.ep = 2 with sampling" in capsys.readouterr().err and not (tmp_path / "ep").exists()


def test_moe_teacher_distils_into_a_dense_student_at_tp2_like_one_process(tmp_path, tokenizer_dir, dataset_prefix):
    """A MoE teacher (a scaletrain checkpoint: its model.moe travels in the checkpoint's model config) is built
    frozen in the student's layout; distilling it into a dense student at tp2·SP equals one process."""
    teacher = tmp_path / "teacher"
    args = ["train", "--config", TINY]
    for s in tiny_overrides(teacher, tokenizer_dir, dataset_prefix, **MOE, **{"train.steps": 4, "train.seq_length": 64}):
        args += ["--set", s]
    assert main(args) == 0

    def distill(par: bool) -> tuple[Path, list[str]]:
        run = tmp_path / str(par)
        a = ["distill", "--config", TINY]
        for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
                "posttrain.distill.teacher": str(teacher), "train.seq_length": 64, "train.global_batch_size": 4,
                "train.micro_batch_size": 1, "train.steps": 3, "precision.dtype": "float64",
                **({"parallel.tp": 2, "parallel.sequence_parallel": True} if par else {})}):
            a += ["--set", s]
        return run, a

    a, b = run_single_and_parallel(distill, 2)
    assert len(a) == 3 and all(x["kd"] > 0 for x in a) and "moe_expert_tokens_cv" not in a[0]  # the student is dense
    assert_same_steps(a, b, 1e-10)


def test_ppo_with_a_moe_policy_and_critic_at_tp2_sp_like_one_process(tmp_path, tokenizer_dir, dataset_prefix, prompts):
    """PPO: rollouts decoded through the policy's MoE blocks, a MoE critic (a `scaletrain reward` run of the same
    shape) valued and trained in the policy's layout; at tp2·SP and at ep2 the steps equal one process's (float64)."""
    rm = tmp_path / "rm"
    synth = tmp_path / "synth"
    assert main(["data", "synth", "--output", str(synth), "--train", "24", "--test", "4"]) == 0
    args = ["reward", "--config", TINY]
    for s in tiny_overrides(rm, tokenizer_dir, dataset_prefix, **MOE, **{
            "posttrain.chat.train_data": f'["{synth / "dpo_train.jsonl"}"]', "train.seq_length": 96,
            "model.num_layers": 4, "train.steps": 2, "train.global_batch_size": 4, "train.micro_batch_size": 1,
            "precision.dtype": "float64"}):
        args += ["--set", s]
    assert main(args) == 0

    def ppo(par: bool | str) -> tuple[Path, list[str]]:
        run, a = tmp_path / str(par), ["ppo", "--config", TINY]
        for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **MOE, **{
                "posttrain.chat.train_data": f'["{prompts}"]', "train.seq_length": 96, "model.num_layers": 4,
                "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.steps": 3,
                "precision.dtype": "float64", "posttrain.rollout.max_new_tokens": 6,
                "posttrain.rewards.functions": '["grpo_rewards:digits"]', "optim.warmup_steps": 1,
                "posttrain.ppo.critic": str(rm), "posttrain.ppo.group_size": 2, "posttrain.ppo.kl_coef": 0.1,
                "posttrain.ppo.iterations": 2, "posttrain.ppo.critic_lr": 3e-3,
                **({"parallel.ep": 2} if par == "ep" else {"parallel.tp": 2, "parallel.sequence_parallel": True}
                   if par else {})}):
            a += ["--set", s]
        return run, a

    a, b = run_single_and_parallel(ppo, 2)
    run, ep_args = ppo("ep")  # ep2 over dp2: rollouts, reference, old-policy and critic passes in lock step
    assert run_ranks(2, cli_rank, ep_args, timeout=240) == [0, 0]
    c = read_metrics(run)
    assert len(a) == 3 and all(x["completion_tokens"] > 0 and "moe_expert_tokens_cv" in x for x in a)
    assert a[0]["value_loss"] > 0 and a[0]["value_loss"] != a[2]["value_loss"]  # the MoE critic trains
    for other in (b, c):
        assert_same_steps(a, other, 1e-10, loss_abs=1e-14)  # on a fresh batch the whitened surrogate is ≈ 0
        for x, y in zip(a, other):
            for k in ("reward", "value_loss", "value_grad_norm"):
                assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), (x["step"], k)


def test_on_policy_distillation_of_a_moe_student_at_ep2_like_one_process(tmp_path, tokenizer_dir, dataset_prefix,
                                                                         synth):
    """On-policy distillation with a MoE student: at ep2 over dp2 each replica samples its own prompts' completions
    (the ep ranks in lock step) and the MoE teacher scores them; the steps equal one process's (float64)."""
    teacher = tmp_path / "teacher"
    args = ["train", "--config", TINY]
    for s in tiny_overrides(teacher, tokenizer_dir, dataset_prefix, **MOE, **{"train.steps": 4, "train.seq_length": 160}):
        args += ["--set", s]
    assert main(args) == 0

    def distill(par: bool) -> tuple[Path, list[str]]:
        run = tmp_path / str(par)
        a = ["distill", "--config", TINY]
        for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **MOE, **{
                "posttrain.distill.teacher": str(teacher), "posttrain.distill.on_policy": True,
                "posttrain.distill.loss": "reverse_kl", "posttrain.chat.train_data": f'["{synth / "sft_train.jsonl"}"]',
                "posttrain.rollout.max_new_tokens": 8, "posttrain.rollout.temperature": 1.0, "train.seq_length": 160,
                "train.global_batch_size": 4, "train.micro_batch_size": 1, "train.steps": 2,
                "precision.dtype": "float64", **({"parallel.ep": 2} if par else {})}):
            a += ["--set", s]
        return run, a

    a, b = run_single_and_parallel(distill, 2)
    assert len(a) == 2 and "moe_expert_tokens_cv" in a[0]
    assert_same_steps(a, b, 1e-10)
    for x, y in zip(a, b):
        assert x["completion_tokens"] == y["completion_tokens"] and abs(x["kd"] - y["kd"]) <= 1e-10 * x["kd"]
