"""The cross-field rules of the RL stages (GRPO, PPO): groups fill the batch and stay on one dp rank,
rollouts fit the rows, rewards resolve, the sandbox works where python_tests needs it."""

from __future__ import annotations

from typing import Any

from scaletrain.config.schema import RunConfig
from scaletrain.config.validate import check_choice
from scaletrain.stages.rl.rewards import reward_problem, sandbox_problems


def rollout_errors(cfg: RunConfig, pt: Any, *, ppo: bool) -> list[str]:
    """Every broken rule of GRPO's (ppo=False) or PPO's settings `pt` (the stage's posttrain settings)."""
    t = cfg.train
    errors: list[str] = []
    check_choice(errors, "posttrain.grpo_loss_norm", pt.grpo_loss_norm, ("token", "sequence"))
    if ppo and pt.group_size < 1:
        errors.append(f"posttrain.group_size = {pt.group_size}: PPO samples at least 1 completion per prompt.")
    elif not ppo and pt.group_size < 2:
        errors.append(f"posttrain.group_size = {pt.group_size}: GRPO compares completions of one prompt, so it "
                      "needs at least 2 (typically 8-16).")
    elif t.global_batch_size % pt.group_size:
        errors.append(f"train.global_batch_size = {t.global_batch_size} (completions per step) must be a multiple "
                      f"of posttrain.group_size = {pt.group_size}.")
    if pt.max_new_tokens < 1 or pt.max_new_tokens >= t.seq_length:
        errors.append(f"posttrain.max_new_tokens = {pt.max_new_tokens} must be in [1, train.seq_length = "
                      f"{t.seq_length}): prompt and completion share one row.")
    if pt.temperature <= 0:
        errors.append(f"posttrain.temperature = {pt.temperature} must be positive: a group of greedy completions "
                      "is one completion repeated, with no reward differences to learn from.")
    if pt.grpo_iterations < 1:
        errors.append(f"posttrain.grpo_iterations = {pt.grpo_iterations} must be at least 1 (updates per rollout batch).")
    if not 0 < pt.clip_eps < 1 or not 0 <= pt.clip_eps_high < 10:
        errors.append(f"posttrain.clip_eps = {pt.clip_eps} must be in (0, 1) and posttrain.clip_eps_high = "
                      f"{pt.clip_eps_high} in [0, 10) (0: the same as clip_eps).")
    if pt.kl_beta < 0:
        errors.append(f"posttrain.kl_beta = {pt.kl_beta} must be 0 (no KL penalty) or positive.")
    if not pt.rewards:
        errors.append("posttrain.rewards is empty: GRPO needs at least one reward function (e.g. [\"math_answer\"]).")
    if pt.reward_weights and len(pt.reward_weights) != len(pt.rewards):
        errors.append(f"posttrain.reward_weights has {len(pt.reward_weights)} entries for {len(pt.rewards)} "
                      "posttrain.rewards: give one weight per reward (or none).")
    for name in pt.rewards:
        problem = reward_problem(name)
        if problem:
            errors.append(f"posttrain.rewards: {problem}")
    errors.extend(sandbox_problems(pt, check_live="python_tests" in pt.rewards))
    if ppo:
        errors += _ppo_errors(pt)
    if pt.missing_stop_penalty < 0:
        errors.append(f"posttrain.missing_stop_penalty = {pt.missing_stop_penalty} must be 0 (off) or positive "
                      "(it is subtracted).")
    if pt.max_sampling_rounds < 1:
        errors.append(f"posttrain.max_sampling_rounds = {pt.max_sampling_rounds} must be at least 1 (sampling rounds "
                      "per rollout batch under posttrain.dynamic_sampling).")
    if ppo and (pt.dynamic_sampling or pt.mask_truncated):
        errors.append("posttrain.dynamic_sampling and posttrain.mask_truncated are GRPO's (DAPO): PPO has no groups to "
                      "filter and its critic learns from every token; turn them off or use posttrain.objective = 'grpo'.")
    if not 0 <= pt.overlong_buffer <= pt.max_new_tokens or pt.overlong_penalty < 0:
        errors.append(f"posttrain.overlong_buffer = {pt.overlong_buffer} must be in [0, posttrain.max_new_tokens = "
                      f"{pt.max_new_tokens}] and posttrain.overlong_penalty = {pt.overlong_penalty} ≥ 0 (it is subtracted).")
    if "reward_model" in pt.rewards and not pt.reward_model:
        errors.append("posttrain.rewards lists 'reward_model' but posttrain.reward_model is empty: point it at a trained "
                      "reward model (an HF directory, or a checkpoint written by `scaletrain reward`).")
    elif pt.reward_model and "reward_model" not in pt.rewards:
        errors.append(f"posttrain.reward_model = {pt.reward_model} is set but posttrain.rewards does not list "
                      "'reward_model'; add it (with a weight in posttrain.reward_weights) or clear posttrain.reward_model.")
    if t.loss_spike_factor:
        errors.append(f"train.loss_spike_factor: the {'ppo' if ppo else 'grpo'} loss changes sign, so a multiple of its "
                      "running mean flags nothing meaningful; set train.loss_spike_factor = 0 (non-finite steps are "
                      "still caught).")
    return errors


def _ppo_errors(pt: Any) -> list[str]:
    errors = []
    if not (pt.critic or pt.reward_model):
        errors.append("posttrain.objective = 'ppo' needs a critic to start from: posttrain.critic (a reward model, "
                      "or a causal LM's HF export) or posttrain.reward_model.")
    if not 0 <= pt.gae_gamma <= 1 or not 0 <= pt.gae_lambda <= 1:
        errors.append(f"posttrain.gae_gamma = {pt.gae_gamma} and gae_lambda = {pt.gae_lambda} must be within [0, 1].")
    if pt.value_clip < 0 or pt.critic_lr < 0:
        errors.append(f"posttrain.value_clip = {pt.value_clip} and critic_lr = {pt.critic_lr} must be ≥ 0.")
    return errors
