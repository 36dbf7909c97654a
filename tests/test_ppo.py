"""PPO: per-token rewards, GAE, whitening and the clipped value loss by hand; `scaletrain ppo` at tp2·pp2+SP and
dp2 equal to the single process (float64, policy and critic); a run stopped between checkpoints resumes
its critic exactly; bad settings exit before training."""

from __future__ import annotations

import pytest
import torch

from scaletrain.cli import main
from scaletrain.stages.rl.ppo import ValueObjective, gae, token_rewards, whiten

from conftest import TINY, read_metrics, tiny_overrides
from parity import run_single_and_parallel

pytestmark = pytest.mark.e2e

# ------------------------------------------------------------------------------------------ maths


def test_token_rewards_put_the_score_on_the_last_completion_token():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    old = torch.tensor([[0.0, -1.0, -2.0, -1.5, 0.0], [0.0, 0.0, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -1.5, 0.0], [0.0, 0.0, -1.0, 0.0, 0.0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), mask, old, ref, kl_beta=0.1)
    assert torch.allclose(r, torch.tensor([[0, -0.05, 0.1, 2.0, 0], [0, 0, -1.0 - 0.05, 0, 0]], dtype=torch.float64))


def test_gae_by_hand():
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    rewards = torch.tensor([[0.0, 0.5, -0.2, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.3, 0.1, 0.4, 9.0]])  # outside the completion: ignored
    g, lam = 0.9, 0.8
    d3 = 1.0 - 0.4
    d2 = -0.2 + g * 0.4 - 0.1
    d1 = 0.5 + g * 0.1 - 0.3
    a3, a2 = d3, d2 + g * lam * d3
    a1 = d1 + g * lam * a2
    adv, ret = gae(rewards, values, mask, g, lam)
    assert adv[0].tolist() == pytest.approx([0, a1, a2, a3, 0])
    assert ret[0].tolist() == pytest.approx([0, a1 + 0.3, a2 + 0.1, a3 + 0.4, 0])
    # λ = 1, γ = 1: Monte-Carlo returns, the sum of the rewards still to come
    _, mc = gae(rewards, values, mask, 1.0, 1.0)
    assert mc[0].tolist() == pytest.approx([0, 1.3, 0.8, 1.0, 0])


def test_whitening_and_the_clipped_value_loss():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = whiten(torch.tensor([[1.0, 2.0, 50.0], [3.0, 0.0, 0.0]]), mask)
    kept = w[mask.bool()]
    assert kept.mean().abs() < 1e-12 and kept.var(unbiased=False) == pytest.approx(1.0, rel=1e-6)
    assert w[0, 2] == 0
    obj = ValueObjective(clip=0.2)
    batch = {"tokens": torch.zeros(1, 2, dtype=torch.long), "loss_mask": torch.tensor([[1, 1]]),
             "returns": torch.tensor([[1.0, 0.0]]), "old_values": torch.tensor([[0.0, 0.0]])}

    class Values(torch.nn.Module):
        def forward(self, tokens, **_):
            return torch.tensor([[[0.5], [0.1]]])

    out, loss_fn = obj.forward_step(batch, Values())
    loss, metrics = loss_fn(out)
    # token 0: plain (0.5 − 1)² = 0.25, clipped (0.2 − 1)² = 0.64 → 0.32; token 1: both 0.01 → 0.005
    assert loss.item() == pytest.approx(0.5 * 0.64 + 0.5 * 0.01)
    assert metrics["value_clip_fraction"].item() == 1


# ---------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer_dir, dataset_prefix):
    run = tmp_path_factory.mktemp("ppo_base")
    args = ["train", "--config", TINY]
    for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
            "model.num_layers": 4, "train.seq_length": 96, "train.steps": 10, "checkpoint.export_hf": "hf"}):
        args += ["--set", s]
    assert main(args) == 0
    return run / "hf"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(out), "--train", "64", "--test", "5"]) == 0
    return out / "sft_train.jsonl"


def _args(run_dir, tokenizer_dir, prefix, prompts, base, **extra):
    args = ["ppo", "--config", TINY]
    for s in tiny_overrides(run_dir, tokenizer_dir, prefix, **{
            "checkpoint.init_from_hf": str(base), "posttrain.ppo.critic": str(base),
            "posttrain.chat.train_data": f'["{prompts}"]', "train.seq_length": 96, "train.global_batch_size": 8,
            "train.micro_batch_size": 2, "train.steps": 3, "precision.dtype": "float64", "posttrain.ppo.group_size": 2,
            "posttrain.rollout.max_new_tokens": 6, "posttrain.rewards.functions": '["grpo_rewards:digits"]', "posttrain.ppo.kl_coef": 0.1,
            "posttrain.ppo.iterations": 2, "posttrain.ppo.gae_lambda": 0.9, "optim.warmup_steps": 1,
            "posttrain.ppo.critic_lr": 3e-3, **extra}):
        args += ["--set", s]
    return args


@pytest.mark.parametrize("layout,world", [({"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}, 4),
                                          ({}, 2), ({"parallel.cp": 2}, 2)], ids=["tp2pp2", "dp2", "cp2"])
def test_ppo_matches_single_process(tmp_path, tokenizer_dir, dataset_prefix, prompts, base_model, layout, world):
    a, b = run_single_and_parallel(lambda par: (tmp_path / str(par), _args(
        tmp_path / str(par), tokenizer_dir, dataset_prefix, prompts, base_model, **(layout if par else {}))), world)
    assert len(a) == 3
    for x, y in zip(a, b):
        # On a fresh batch the ratio is 1 and the advantages are whitened: the loss is −mean(A) ≈ 0 (rounding)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-10, abs=1e-14), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-10), x["step"]
        for k in ("reward", "value_loss", "value_grad_norm", "clip_fraction", "reward_errors"):
            assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), (x["step"], k)
        assert x["value_loss"] > 0 and x["reward_errors"] == 0  # PPO counts them too (GRPO's rollouts)
    assert a[0]["clip_fraction"] == 0.0 and a[1]["clip_fraction"] >= 0.0  # step 2 reuses step 1's batch
    assert a[0]["value_loss"] != a[2]["value_loss"]  # the critic trains
    assert (tmp_path / "False" / "critic").is_dir()


def test_a_stopped_run_resumes_its_critic(tmp_path, tokenizer_dir, dataset_prefix, prompts, base_model):
    full = tmp_path / "full"
    assert main(_args(full, tokenizer_dir, dataset_prefix, prompts, base_model, **{"train.steps": 4})) == 0
    part = tmp_path / "part"
    extra = {"train.steps": 4, "train.exit_interval": 3, "train.deterministic": True}
    assert main(_args(part, tokenizer_dir, dataset_prefix, prompts, base_model, **extra)) == 0
    assert (part / "critic" / "step_0000003").is_dir()
    assert main(_args(part, tokenizer_dir, dataset_prefix, prompts, base_model, **extra)) == 0
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("loss", "grad_norm", "value_loss", "reward"):
            assert x[k] == pytest.approx(y[k], rel=1e-12, abs=1e-15), (x["step"], k)


def test_ppo_needs_a_critic(tmp_path, tokenizer_dir, dataset_prefix, prompts, base_model, capsys):
    assert main(_args(tmp_path / "bad", tokenizer_dir, dataset_prefix, prompts, base_model,
                      **{"posttrain.ppo.critic": ""})) == 2
    assert "needs a critic to start from" in capsys.readouterr().err


def test_planner_counts_reference_reward_model_and_critic():
    """PPO at pp1, float32: the reference policy and the reward model cost their weights (4 bytes a
    parameter); the critic its weights, gradients and AdamW's two moments (16 bytes)."""
    import dataclasses

    from scaletrain.config.posttrain import PostTrainConfig, PPOConfig, RewardsConfig
    from scaletrain.config.schema import ModelConfig, RunConfig, TrainConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.profile.planner import format_plan, plan, stage_params

    def model(layers, labels=0):
        return resolve_model(ModelConfig(num_layers=layers, hidden_size=64, num_heads=4, num_kv_heads=2,
                                         ffn_hidden_size=128, vocab_size=512, num_labels=labels),
                             tokenizer_vocab=512, tp=1, seq_length=64)

    cfg = RunConfig(model=model(2), train=TrainConfig(global_batch_size=8, micro_batch_size=2, seq_length=64),
                    posttrain=PostTrainConfig(objective="ppo", ppo=PPOConfig(kl_coef=0.1),
                                              rewards=RewardsConfig(functions=("reward_model",), model="rm")))
    cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="float32"))
    rm, critic = model(4, labels=1), model(2, labels=1)
    base = plan(cfg, 1)
    p = plan(cfg, 1, frozen=(cfg.model, rm), trainable=(critic,))
    layout = type(p.layout)(1, 1, 1, 1)
    want = 4 * (stage_params(cfg.model, layout, 0)[0] + stage_params(rm, layout, 0)[0]) \
        + 16 * stage_params(critic, layout, 0)[0]
    # by hand: the 4-layer reward model has 4·36,992 + 512·64 embedding + 64 norm + 64 score = 180,864
    assert stage_params(rm, layout, 0)[0] == 4 * 36_992 + 512 * 64 + 64 + 64
    assert p.stages[0].companion_bytes == want
    assert p.stages[0].total_bytes == base.stages[0].total_bytes + want
    assert " others " in format_plan(p)
