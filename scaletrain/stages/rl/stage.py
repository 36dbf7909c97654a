"""The RL stages: GRPO (`grpo`: group-relative advantages, DAPO's options) and PPO (`ppo`: a learned critic,
per-token KL-penalised rewards, GAE), both on completions sampled per step on the training layout.

Their companions: the frozen reference policy (posttrain.grpo.beta or posttrain.ppo.kl_coef > 0: a copy of the starting weights, saved
under run_dir/reference at the first start and loaded from there on resumption), the reward model
(posttrain.rewards.functions lists 'reward_model': RLHF) and, for PPO, the critic with its own optimizer (its updates
are the `CriticUpdate` phase). Validation: held-out rewards of greedy completions, no loss.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

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
from scaletrain.stages.stage import Companion, RunParts, Stage, StageParts
from scaletrain.trainer.contracts import Phase
from scaletrain.trainer.loop import LoopState
from scaletrain.trainer.optimizer import build_optimizer

REFERENCE_DIR = "reference"


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
        raise CheckpointError(f"{root} is missing: a resumed GRPO/PPO run with a KL penalty needs the reference "
                              "policy saved at its first start; restore it or start a new run directory")
    else:
        ref.load_state_dict(policy.state_dict())
        path = save_checkpoint(root, 0, ref, None, {"model_config": dataclasses.asdict(parts.cfg.model)}, dims=parts.dims)
        parts.log(f"reference policy: the starting weights, saved to {path}")
    ref.eval()
    return ref


def reward_model_scorer(parts: RunParts, path: str) -> RewardModelScorer:
    """GRPO's learned reward (RLHF): the reward model, frozen, in the policy's layout."""
    rm, line = parts.models.frozen("posttrain.rewards.model", path)
    parts.log(f"reward model: {line}")
    tok, cfg = parts.tokenizer, parts.cfg
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    return RewardModelScorer(rm, parts.dims, pad_id=pad, eos_id=tok.eos_id, micro_batch=cfg.train.micro_batch_size,
                             precision=parts.precision, device=parts.device,
                             width_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)


def build_critic(parts: RunParts, s: Any) -> tuple[Critic, dict[str, float]]:
    """PPO's critic, trainable, in the policy's layout, with its AdamW: from posttrain.ppo.critic (or the reward
    model) on a first start, from run_dir/critic at the resumed step otherwise (with its last update's metrics)."""
    cfg = parts.cfg
    model, m, line = parts.models.score_model("posttrain.ppo.critic", s.ppo.critic or s.rewards.model,
                                              seed=cfg.train.seed + 1, load=not parts.resumed)
    lr = s.ppo.critic_lr or cfg.optim.lr
    optimizer = build_optimizer(model, dataclasses.replace(cfg.optim, lr=lr, distributed=False), parts.device,
                                parts.dims)
    critic = Critic(model, optimizer, lr=lr, clip_grad=cfg.optim.clip_grad, value_clip=s.ppo.value_clip, dims=parts.dims,
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
    """What GRPO and PPO share: prompts, sampling, rewards, the reference policy and held-out rewards. Each reads
    its own section (posttrain.grpo, posttrain.ppo: `own`) and the shared chat, rollout, rewards and sandbox ones."""

    data_rows = "`messages` or `prompt`"
    ppo: ClassVar[bool] = False  # PPO's rules (a critic, group size 1 allowed) rather than GRPO's
    sections: ClassVar[tuple[str, ...]] = ("chat", "rollout", "rewards", "sandbox")

    def own(self, s: Any) -> Any:
        """This stage's own section of settings `s` (GRPOConfig or PPOConfig)."""
        raise NotImplementedError

    def kl_coef(self, s: Any) -> float:
        """β of the KL penalty to the frozen starting policy (0: no reference policy)."""
        raise NotImplementedError

    def validate(self, cfg: RunConfig) -> list[str]:
        s = self.settings(cfg)
        return rollout_errors(cfg, s, self.own(s), self.kl_coef(s), ppo=self.ppo)

    def rollout_group(self, cfg: RunConfig) -> int:
        return int(self.own(self.settings(cfg)).group_size)

    def reference_policy(self, cfg: RunConfig) -> bool:
        return bool(self.kl_coef(self.settings(cfg)))

    def companions(self, cfg: RunConfig) -> list[Companion]:
        r = self.settings(cfg).rewards
        return [Companion("posttrain.rewards.model", r.model, "reward")] if MODEL_REWARD in r.functions else []

    def render(self, parts: RunParts) -> tuple[Any, Any]:
        s = self.settings(parts.cfg)
        return render_prompts(s.chat, s.rollout, parts.tokenizer, parts.cfg.train.seq_length, parts.log,
                              s.rewards.functions)

    def objective(self, parts: RunParts, s: Any) -> GRPOObjective:
        raise NotImplementedError

    def sampling_options(self, s: Any) -> dict[str, Any]:
        """RolloutBatches' arguments from this stage's own section (GRPO: DAPO's options)."""
        return {}

    def rollout_settings(self, parts: RunParts, model: torch.nn.Module, s: Any, state: LoopState) -> dict[str, Any]:
        """RolloutBatches' arguments: the reference and reward model are built here (logged in this order)."""
        cfg, t, tok, r, ro = parts.cfg, parts.cfg.train, parts.tokenizer, s.rewards, s.rollout
        reference = reference_policy(parts, model) if self.kl_coef(s) else None
        scorer = reward_model_scorer(parts, r.model) if MODEL_REWARD in r.functions else None
        if "python_tests" in r.functions:
            parts.log(describe(sandbox_settings(s.sandbox)))
        sandbox = sandbox_settings(s.sandbox)
        rewards = {n: scorer if n == MODEL_REWARD else resolve_reward(n, sandbox) for n in r.functions}
        return dict(
            model=model, reference=reference, dims=parts.dims, rewards=rewards, reward_weights=r.weights,
            group_size=self.own(s).group_size, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
            global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
            seq_length=t.seq_length, seed=t.seed, consumed_samples=state.consumed_samples, tokenizer=tok,
            # The template's end-of-turn marker ends a completion (and is learnt, like eos).
            stop_text=ChatRenderer(tok, s.chat.template).end_of_turn(), precision=parts.precision,
            device=parts.device, fused_cross_entropy=parts.fused_cross_entropy, run_dir=Path(t.run_dir),
            width_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1, iterations=self.own(s).iterations,
            missing_stop_penalty=r.missing_stop_penalty, overlong_buffer=r.overlong_buffer,
            overlong_penalty=r.overlong_penalty, rollout_micro_batch=ro.micro_batch or t.micro_batch_size,
            **self.sampling_options(s))

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
    help = ("RL on verifiable rewards (GRPO: sampled groups, group-relative advantages; [posttrain.grpo] section; "
            "= train with posttrain.objective=grpo)")
    sections = (*RolloutStage.sections, "grpo")

    def own(self, s: Any) -> Any:
        return s.grpo

    def kl_coef(self, s: Any) -> float:
        return float(s.grpo.beta)

    def objective(self, parts: RunParts, s: Any) -> GRPOObjective:
        g = s.grpo
        return GRPOObjective(parts.dims.tp_comm, kl_beta=g.beta, temperature=s.rollout.temperature,
                             loss_norm=g.loss_norm, fused_cross_entropy=parts.fused_cross_entropy,
                             clipped=g.iterations > 1, clip_eps=g.clip_eps, clip_eps_high=g.clip_eps_high,
                             cp=parts.dims.comm("cp"))

    def sampling_options(self, s: Any) -> dict[str, Any]:
        g = s.grpo
        return dict(scale_rewards=g.scale_rewards, mask_truncated=g.mask_truncated,
                    dynamic_sampling=g.dynamic_sampling, max_sampling_rounds=g.max_sampling_rounds)


class PPOStage(RolloutStage):
    name = "ppo"
    help = ("RLHF with PPO: a learned critic, per-token KL-penalised rewards, GAE and the clipped surrogate "
            "([posttrain.ppo] section; = train with posttrain.objective=ppo)")
    sections = (*RolloutStage.sections, "ppo")
    ppo = True

    def own(self, s: Any) -> Any:
        return s.ppo

    def kl_coef(self, s: Any) -> float:
        return float(s.ppo.kl_coef)

    def companions(self, cfg: RunConfig) -> list[Companion]:
        s = self.settings(cfg)
        return [*super().companions(cfg), Companion("posttrain.ppo.critic", s.ppo.critic or s.rewards.model, "critic")]

    def objective(self, parts: RunParts, s: Any) -> GRPOObjective:
        # The KL penalty is in the per-token reward (stages/rl/ppo.py), not in the loss; the sampling-time
        # log-probs are always at hand, so the ratio is clipped from the first update.
        p = s.ppo
        return GRPOObjective(parts.dims.tp_comm, kl_beta=0.0, temperature=s.rollout.temperature, loss_norm="token",
                             fused_cross_entropy=parts.fused_cross_entropy, clipped=True, clip_eps=p.clip_eps,
                             clip_eps_high=p.clip_eps_high, cp=parts.dims.comm("cp"))

    def sampling_options(self, s: Any) -> dict[str, Any]:
        return dict(scale_rewards=False)  # unused: the critic's GAE gives PPO's advantages

    def batches(self, parts: RunParts, prompts: PromptDataset, settings: dict[str, Any], s: Any
                ) -> tuple[RolloutBatches, tuple[Phase, ...]]:
        critic, last = build_critic(parts, s)
        p = s.ppo
        source = PPORollouts(prompts, critic=critic, kl_beta=p.kl_coef, gamma=p.gae_gamma, lam=p.gae_lambda,
                             whiten_advantages=p.whiten_advantages, **settings)
        return source, (CriticUpdate(critic, p.iterations, last),)
