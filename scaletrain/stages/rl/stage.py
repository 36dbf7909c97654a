"""The RL stages: GRPO (`grpo`: group-relative advantages, DAPO's options) and PPO (`ppo`: a learned critic,
per-token KL-penalised rewards, GAE), both on completions sampled per step on the training layout.

Their companions: the frozen reference policy (posttrain.kl_beta > 0: a copy of the starting weights, saved
under run_dir/reference at the first start and loaded from there on resumption), the reward model
(posttrain.rewards lists 'reward_model': RLHF) and, for PPO, the critic with its own optimizer (its updates
are the `CriticUpdate` phase). Validation: held-out rewards of greedy completions, no loss.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from scaletrain.config.schema import RunConfig
from scaletrain.stages.rl.critic import Critic, CriticUpdate
from scaletrain.stages.rl.grpo import GRPOObjective
from scaletrain.stages.rl.ppo_rollouts import PPORollouts
from scaletrain.stages.rl.prompts import PromptDataset, render_prompts
from scaletrain.stages.rl.reward_model_scorer import RewardModelScorer
from scaletrain.stages.rl.rewards import MODEL_REWARD, resolve_reward, sandbox_settings
from scaletrain.stages.rl.rollouts import HeldOutRewards, RolloutBatches
from scaletrain.stages.rl.rules import rollout_errors
from scaletrain.stages.rl.sandbox.runner import describe
from scaletrain.stages.stage import CHAT_DATA, ROLLOUT, Companion, RunParts, Stage, StageParts
from scaletrain.trainer.contracts import Phase
from scaletrain.trainer.loop import LoopState
from scaletrain.trainer.optimizer import build_optimizer

REFERENCE_DIR = "reference"
SANDBOX = ("sandbox", "sandbox_timeout_s", "sandbox_memory_mb", "sandbox_processes", "sandbox_disk_mb",
           "sandbox_workers", "sandbox_python")
REWARDS = ("rewards", "reward_weights", "reward_model", "missing_stop_penalty", "overlong_buffer", "overlong_penalty",
           *SANDBOX)
POLICY_GRADIENT = ("group_size", "kl_beta", "scale_rewards", "grpo_iterations", "clip_eps", "clip_eps_high",
                   "grpo_loss_norm", "dynamic_sampling", "max_sampling_rounds", "mask_truncated")
CRITIC = ("critic", "critic_lr", "gae_gamma", "gae_lambda", "value_clip", "whiten_advantages")


def reference_policy(parts: RunParts, policy: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference policy for the KL penalty: the same model in the same layout, without
    gradients. A run's first start copies the policy's starting weights into it and saves them
    under run_dir/reference (a checkpoint like any other); a resumed run loads them from there."""
    ref = parts.models.copy_of_policy()
    root = parts.run_dir / REFERENCE_DIR
    saved = latest_checkpoint(root)
    if saved is not None:
        load_checkpoint(saved, ref, None, dims=parts.dims)
        parts.log(f"reference policy: loaded from {saved}")
    elif latest_checkpoint(parts.run_dir / "checkpoints") is not None:
        raise CheckpointError(f"{root} is missing: a resumed GRPO run with posttrain.kl_beta > 0 needs the reference "
                              "policy saved at its first start; restore it or start a new run directory")
    else:
        ref.load_state_dict(policy.state_dict())
        path = save_checkpoint(root, 0, ref, None, {"model_config": dataclasses.asdict(parts.cfg.model)}, dims=parts.dims)
        parts.log(f"reference policy: the starting weights, saved to {path}")
    ref.eval()
    return ref


def reward_model_scorer(parts: RunParts, path: str) -> RewardModelScorer:
    """GRPO's learned reward (RLHF): the reward model, frozen, in the policy's layout."""
    rm, line = parts.models.frozen("posttrain.reward_model", path)
    parts.log(f"reward model: {line}")
    tok, cfg = parts.tokenizer, parts.cfg
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    return RewardModelScorer(rm, parts.dims, pad_id=pad, eos_id=tok.eos_id, micro_batch=cfg.train.micro_batch_size,
                             precision=parts.precision, device=parts.device,
                             width_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)


def build_critic(parts: RunParts, s: Any) -> tuple[Critic, dict[str, float]]:
    """PPO's critic, trainable, in the policy's layout, with its AdamW: from posttrain.critic (or the reward
    model) on a first start, from run_dir/critic at the resumed step otherwise (with its last update's metrics)."""
    cfg = parts.cfg
    model, m, line = parts.models.score_model("posttrain.critic", s.critic or s.reward_model, seed=cfg.train.seed + 1,
                                              load=not parts.resumed)
    lr = s.critic_lr or cfg.optim.lr
    optimizer = build_optimizer(model, dataclasses.replace(cfg.optim, lr=lr, distributed=False), parts.device,
                                parts.dims)
    critic = Critic(model, optimizer, lr=lr, clip_grad=cfg.optim.clip_grad, value_clip=s.value_clip, dims=parts.dims,
                    precision=parts.precision, device=parts.device, model_config=dataclasses.asdict(m),
                    keep_last=cfg.checkpoint.keep_last)
    last: dict[str, float] = {}
    if parts.resumed:
        path, last = critic.load(parts.run_dir, parts.start_step)
        parts.log(f"critic: resumed from {path}")
    else:
        parts.log(f"critic: {line}")
    return critic, last


class RolloutStage(Stage):
    """What GRPO and PPO share: prompts, sampling, rewards, the reference policy and held-out rewards."""

    data_rows = "`messages` or `prompt`"
    ppo = False

    def validate(self, cfg: RunConfig) -> list[str]:
        return rollout_errors(cfg, self.settings(cfg), ppo=self.ppo)

    def rollout_group(self, cfg: RunConfig) -> int:
        return int(self.settings(cfg).group_size)

    def reference_policy(self, cfg: RunConfig) -> bool:
        return bool(self.settings(cfg).kl_beta)

    def companions(self, cfg: RunConfig) -> list[Companion]:
        pt = self.settings(cfg)
        return [Companion("posttrain.reward_model", pt.reward_model, "reward")] if MODEL_REWARD in pt.rewards else []

    def render(self, parts: RunParts) -> tuple[Any, Any]:
        s = self.settings(parts.cfg)
        return render_prompts(s, parts.tokenizer, parts.cfg.train.seq_length, parts.log, s.rewards)

    def objective(self, parts: RunParts, s: Any) -> GRPOObjective:
        return GRPOObjective(parts.dims.tp_comm, kl_beta=s.kl_beta, temperature=s.temperature,
                             loss_norm=s.grpo_loss_norm, fused_cross_entropy=parts.fused_cross_entropy,
                             clipped=s.grpo_iterations > 1, clip_eps=s.clip_eps, clip_eps_high=s.clip_eps_high,
                             cp=parts.dims.comm("cp"))

    def rollout_settings(self, parts: RunParts, model: torch.nn.Module, s: Any, state: LoopState) -> dict[str, Any]:
        """RolloutBatches' arguments: the reference and reward model are built here (logged in this order)."""
        cfg, t, tok = parts.cfg, parts.cfg.train, parts.tokenizer
        reference = reference_policy(parts, model) if s.kl_beta else None
        scorer = reward_model_scorer(parts, s.reward_model) if MODEL_REWARD in s.rewards else None
        if "python_tests" in s.rewards:
            parts.log(describe(sandbox_settings(s)))
        sandbox = sandbox_settings(s)
        rewards = {n: scorer if n == MODEL_REWARD else resolve_reward(n, sandbox) for n in s.rewards}
        return dict(
            model=model, reference=reference, dims=parts.dims, rewards=rewards, reward_weights=s.reward_weights,
            group_size=s.group_size, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
            scale_rewards=s.scale_rewards, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
            seq_length=t.seq_length, seed=t.seed, consumed_samples=state.consumed_samples, tokenizer=tok,
            # The template's end-of-turn marker ends a completion (and is learnt, like eos).
            stop_text=ChatRenderer(tok, s.chat_template).end_of_turn(), precision=parts.precision,
            device=parts.device, fused_cross_entropy=parts.fused_cross_entropy, run_dir=Path(t.run_dir),
            width_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1, iterations=s.grpo_iterations,
            missing_stop_penalty=s.missing_stop_penalty, overlong_buffer=s.overlong_buffer,
            overlong_penalty=s.overlong_penalty, mask_truncated=s.mask_truncated, dynamic_sampling=s.dynamic_sampling,
            max_sampling_rounds=s.max_sampling_rounds, rollout_micro_batch=s.rollout_micro_batch or t.micro_batch_size)

    def batches(self, parts: RunParts, prompts: PromptDataset, settings: dict[str, Any], s: Any
                ) -> tuple[RolloutBatches, tuple[Phase, ...]]:
        return RolloutBatches(prompts, **settings), ()

    def build(self, parts: RunParts, model: torch.nn.Module, rendered: tuple[Any, Any], state: LoopState) -> StageParts:
        s = self.settings(parts.cfg)
        objective = self.objective(parts, s)
        train, valid = rendered
        batches, phases = self.batches(parts, train, self.rollout_settings(parts, model, s, state), s)
        validator = HeldOutRewards(batches, valid) if valid is not None and parts.cfg.train.eval_interval else None
        return StageParts(objective, batches, phases, validator)


class GRPOStage(RolloutStage):
    name = "grpo"
    help = ("RL on verifiable rewards (GRPO: sampled groups, group-relative advantages; [posttrain] section; "
            "= train with posttrain.objective=grpo)")
    fields = (*CHAT_DATA, *ROLLOUT, *REWARDS, *POLICY_GRADIENT)


class PPOStage(RolloutStage):
    name = "ppo"
    help = ("RLHF with PPO: a learned critic, per-token KL-penalised rewards, GAE and the clipped surrogate "
            "(= train with posttrain.objective=ppo)")
    fields = (*CHAT_DATA, *ROLLOUT, *REWARDS, *POLICY_GRADIENT, *CRITIC)
    ppo = True

    def companions(self, cfg: RunConfig) -> list[Companion]:
        pt = self.settings(cfg)
        return [*super().companions(cfg), Companion("posttrain.critic", pt.critic or pt.reward_model, "critic")]

    def objective(self, parts: RunParts, s: Any) -> GRPOObjective:
        # The KL penalty is in the per-token reward (stages/rl/ppo.py), not in the loss; the sampling-time
        # log-probs are always at hand, so the ratio is clipped from the first update.
        return GRPOObjective(parts.dims.tp_comm, kl_beta=0.0, temperature=s.temperature, loss_norm="token",
                             fused_cross_entropy=parts.fused_cross_entropy, clipped=True, clip_eps=s.clip_eps,
                             clip_eps_high=s.clip_eps_high, cp=parts.dims.comm("cp"))

    def batches(self, parts: RunParts, prompts: PromptDataset, settings: dict[str, Any], s: Any
                ) -> tuple[RolloutBatches, tuple[Phase, ...]]:
        critic, last = build_critic(parts, s)
        source = PPORollouts(prompts, critic=critic, kl_beta=s.kl_beta, gamma=s.gae_gamma, lam=s.gae_lambda,
                             whiten_advantages=s.whiten_advantages, **settings)
        return source, (CriticUpdate(critic, s.grpo_iterations, last),)
