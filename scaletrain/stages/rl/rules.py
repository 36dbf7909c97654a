"""The cross-field rules of the RL stages (GRPO, PPO): groups fill the batch and stay on one dp rank,
rollouts fit the rows, rewards resolve, the sandbox works where python_tests needs it."""

from __future__ import annotations

from typing import Any

from scaletrain.config.schema import RunConfig
from scaletrain.config.validate import check_choice
from scaletrain.stages.rl.rewards import reward_problem, sandbox_problems


def rollout_errors(cfg: RunConfig, s: Any, own: Any, kl_coef: float, *, ppo: bool) -> list[str]:
    """Every broken rule of GRPO's (ppo=False) or PPO's settings: `s` holds the shared sections (rollout, rewards,
    sandbox), `own` the stage's own (posttrain.grpo or posttrain.ppo), `kl_coef` its KL penalty's β."""
    t, ro, r = cfg.train, s.rollout, s.rewards
    sec = "posttrain.ppo" if ppo else "posttrain.grpo"
    errors: list[str] = []
    if not ppo:
        check_choice(errors, "posttrain.grpo.loss_norm", own.loss_norm, ("token", "sequence"))
    if ppo and own.group_size < 1:
        errors.append(f"{sec}.group_size = {own.group_size}: PPO samples at least 1 completion per prompt.")
    elif not ppo and own.group_size < 2:
        errors.append(f"{sec}.group_size = {own.group_size}: GRPO compares completions of one prompt, so it "
                      "needs at least 2 (typically 8-16).")
    elif t.global_batch_size % own.group_size:
        errors.append(f"train.global_batch_size = {t.global_batch_size} (completions per step) must be a multiple "
                      f"of {sec}.group_size = {own.group_size}.")
    if ro.max_new_tokens < 1 or ro.max_new_tokens >= t.seq_length:
        errors.append(f"posttrain.rollout.max_new_tokens = {ro.max_new_tokens} must be in [1, train.seq_length = "
                      f"{t.seq_length}): prompt and completion share one row.")
    if ro.temperature <= 0:
        errors.append(f"posttrain.rollout.temperature = {ro.temperature} must be positive: a group of greedy "
                      "completions is one completion repeated, with no reward differences to learn from.")
    if own.iterations < 1:
        errors.append(f"{sec}.iterations = {own.iterations} must be at least 1 (updates per rollout batch).")
    if not 0 < own.clip_eps < 1 or not 0 <= own.clip_eps_high < 10:
        errors.append(f"{sec}.clip_eps = {own.clip_eps} must be in (0, 1) and {sec}.clip_eps_high = "
                      f"{own.clip_eps_high} in [0, 10) (0: the same as clip_eps).")
    if kl_coef < 0:
        errors.append(f"{sec}.{'kl_coef' if ppo else 'beta'} = {kl_coef} must be 0 (no KL penalty) or positive.")
    if not r.functions:
        errors.append("posttrain.rewards.functions is empty: GRPO needs at least one reward function "
                      "(e.g. [\"math_answer\"]).")
    if r.weights and len(r.weights) != len(r.functions):
        errors.append(f"posttrain.rewards.weights has {len(r.weights)} entries for {len(r.functions)} "
                      "posttrain.rewards.functions: give one weight per reward (or none).")
    for name in r.functions:
        problem = reward_problem(name)
        if problem:
            errors.append(f"posttrain.rewards.functions: {problem}")
    errors.extend(sandbox_problems(s.sandbox, check_live="python_tests" in r.functions))
    if ppo:
        errors += _ppo_errors(own, r)
    if r.missing_stop_penalty < 0:
        errors.append(f"posttrain.rewards.missing_stop_penalty = {r.missing_stop_penalty} must be 0 (off) or "
                      "positive (it is subtracted).")
    if not ppo and own.max_sampling_rounds < 1:
        errors.append(f"posttrain.grpo.max_sampling_rounds = {own.max_sampling_rounds} must be at least 1 (sampling "
                      "rounds per rollout batch under posttrain.grpo.dynamic_sampling).")
    if not 0 <= r.overlong_buffer <= ro.max_new_tokens or r.overlong_penalty < 0:
        errors.append(f"posttrain.rewards.overlong_buffer = {r.overlong_buffer} must be in [0, "
                      f"posttrain.rollout.max_new_tokens = {ro.max_new_tokens}] and posttrain.rewards.overlong_penalty "
                      f"= {r.overlong_penalty} ≥ 0 (it is subtracted).")
    if "reward_model" in r.functions and not r.model:
        errors.append("posttrain.rewards.functions lists 'reward_model' but posttrain.rewards.model is empty: point it "
                      "at a trained reward model (an HF directory, or a checkpoint written by `scaletrain reward`).")
    elif r.model and "reward_model" not in r.functions:
        errors.append(f"posttrain.rewards.model = {r.model} is set but posttrain.rewards.functions does not list "
                      "'reward_model'; add it (with a weight in posttrain.rewards.weights) or clear "
                      "posttrain.rewards.model.")
    if t.loss_spike_factor:
        errors.append(f"train.loss_spike_factor: the {'ppo' if ppo else 'grpo'} loss changes sign, so a multiple of its "
                      "running mean flags nothing meaningful; set train.loss_spike_factor = 0 (non-finite steps are "
                      "still caught).")
    return errors


def _ppo_errors(p: Any, r: Any) -> list[str]:
    errors = []
    if not (p.critic or r.model):
        errors.append("posttrain.objective = 'ppo' needs a critic to start from: posttrain.ppo.critic (a reward model, "
                      "or a causal LM's HF export) or posttrain.rewards.model.")
    if not 0 <= p.gae_gamma <= 1 or not 0 <= p.gae_lambda <= 1:
        errors.append(f"posttrain.ppo.gae_gamma = {p.gae_gamma} and gae_lambda = {p.gae_lambda} must be within [0, 1].")
    if p.value_clip < 0 or p.critic_lr < 0:
        errors.append(f"posttrain.ppo.value_clip = {p.value_clip} and critic_lr = {p.critic_lr} must be ≥ 0.")
    return errors
