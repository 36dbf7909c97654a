"""Renamed config keys: the one table of old key → new key(s), and the step that moves them on load.

A run file, a `--set` override or a run directory's saved config.toml may still use an old key; it lands at
its new place and rank 0 prints one notice per old key per process naming the new key. The resolved config
(RUN_DIR/config.toml) is written with the new keys only. An old key that fed several stages (PPO was
configured through GRPO's names) lands in each of them. Setting an old key and its new key to different
values in one file (or in the `--set` overrides) is an error.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# old dotted key → the new dotted key(s) it sets (docs/run-interface.md's "Renamed keys" table is generated from it)
RENAMED: dict[str, tuple[str, ...]] = {
    "posttrain.train_data": ("posttrain.chat.train_data",),
    "posttrain.valid_data": ("posttrain.chat.valid_data",),
    "posttrain.chat_template": ("posttrain.chat.template",),
    "posttrain.tools": ("posttrain.chat.tools",),
    "posttrain.loss_on": ("posttrain.sft.loss_on",),
    "posttrain.packing": ("posttrain.sft.packing",),
    "posttrain.over_length": ("posttrain.sft.over_length",),
    "posttrain.dpo_loss": ("posttrain.dpo.loss_type",),
    "posttrain.beta": ("posttrain.dpo.beta",),
    "posttrain.label_smoothing": ("posttrain.dpo.label_smoothing",),
    "posttrain.simpo_gamma": ("posttrain.dpo.simpo_gamma",),
    "posttrain.nll_weight": ("posttrain.dpo.nll_weight",),
    "posttrain.reward_margin": ("posttrain.reward.margin",),
    "posttrain.reward_center": ("posttrain.reward.center_coefficient",),
    "posttrain.rewards": ("posttrain.rewards.functions",),
    "posttrain.reward_weights": ("posttrain.rewards.weights",),
    "posttrain.reward_model": ("posttrain.rewards.model",),
    "posttrain.missing_stop_penalty": ("posttrain.rewards.missing_stop_penalty",),
    "posttrain.overlong_buffer": ("posttrain.rewards.overlong_buffer",),
    "posttrain.overlong_penalty": ("posttrain.rewards.overlong_penalty",),
    "posttrain.sandbox": ("posttrain.sandbox.backend",),
    "posttrain.sandbox_timeout_s": ("posttrain.sandbox.timeout_s",),
    "posttrain.sandbox_memory_mb": ("posttrain.sandbox.memory_mb",),
    "posttrain.sandbox_processes": ("posttrain.sandbox.processes",),
    "posttrain.sandbox_disk_mb": ("posttrain.sandbox.disk_mb",),
    "posttrain.sandbox_workers": ("posttrain.sandbox.workers",),
    "posttrain.sandbox_python": ("posttrain.sandbox.python",),
    "posttrain.max_new_tokens": ("posttrain.rollout.max_new_tokens",),
    "posttrain.temperature": ("posttrain.rollout.temperature",),
    "posttrain.rollout_micro_batch": ("posttrain.rollout.micro_batch",),
    "posttrain.group_size": ("posttrain.grpo.group_size", "posttrain.ppo.group_size"),
    "posttrain.kl_beta": ("posttrain.grpo.beta", "posttrain.ppo.kl_coef"),
    "posttrain.scale_rewards": ("posttrain.grpo.scale_rewards",),
    "posttrain.grpo_iterations": ("posttrain.grpo.iterations", "posttrain.ppo.iterations"),
    "posttrain.clip_eps": ("posttrain.grpo.clip_eps", "posttrain.ppo.clip_eps"),
    "posttrain.clip_eps_high": ("posttrain.grpo.clip_eps_high", "posttrain.ppo.clip_eps_high"),
    "posttrain.grpo_loss_norm": ("posttrain.grpo.loss_norm",),
    "posttrain.dynamic_sampling": ("posttrain.grpo.dynamic_sampling",),
    "posttrain.max_sampling_rounds": ("posttrain.grpo.max_sampling_rounds",),
    "posttrain.mask_truncated": ("posttrain.grpo.mask_truncated",),
    "posttrain.critic": ("posttrain.ppo.critic",),
    "posttrain.critic_lr": ("posttrain.ppo.critic_lr",),
    "posttrain.gae_gamma": ("posttrain.ppo.gae_gamma",),
    "posttrain.gae_lambda": ("posttrain.ppo.gae_lambda",),
    "posttrain.value_clip": ("posttrain.ppo.value_clip",),
    "posttrain.whiten_advantages": ("posttrain.ppo.whiten_advantages",),
    "posttrain.teacher": ("posttrain.distill.teacher",),
    "posttrain.distill_loss": ("posttrain.distill.loss",),
    "posttrain.distill_temperature": ("posttrain.distill.temperature",),
    "posttrain.distill_alpha": ("posttrain.distill.alpha",),
    "posttrain.distill_top_k": ("posttrain.distill.top_k",),
    "posttrain.distill_on_policy": ("posttrain.distill.on_policy",),
}

_announced: set[str] = set()  # old keys whose notice this process printed


class RenameConflict(ValueError):
    """An old key and its new key set to different values in the same file or `--set` list."""


def is_old(path: tuple[str, ...], value: Any) -> bool:
    """Whether `path` = value is a renamed key. `posttrain.rewards` and `posttrain.sandbox` are both an old key
    (a list, a string) and a new section (a table): the value's type tells them apart."""
    return ".".join(path) in RENAMED and not isinstance(value, dict)


def notice(old: str) -> str:
    return f"config: {old} is renamed {' and '.join(RENAMED[old])}; it still works for now, please use the new key."


def announce(old: str) -> None:
    """Print `old`'s notice once per process, on rank 0 only (every rank loads the same config)."""
    if old in _announced or os.environ.get("RANK", "0") != "0":
        return
    _announced.add(old)
    print(notice(old), file=sys.stderr, flush=True)


def get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def migrate(tree: dict[str, Any], origin: str) -> dict[str, Any]:
    """`tree` (one file's or the overrides' nested keys) with every old key moved to its new key(s), in place;
    raises RenameConflict naming both keys when the same source also sets a new key to another value."""
    for section, body in list(tree.items()):
        if not isinstance(body, dict):
            continue
        for key, value in list(body.items()):
            old = (section, key)
            if not is_old(old, value):
                continue
            name = ".".join(old)
            del body[key]
            for new in RENAMED[name]:
                path = tuple(new.split("."))
                present = get(tree, path)
                if present is not None and present != value:
                    raise RenameConflict(f"{origin}: {name} = {value!r} and {new} = {present!r} set the same thing "
                                         f"({name} is the old name of {new}); keep only {new}.")
                put(tree, path, value)
            announce(name)
    return tree
