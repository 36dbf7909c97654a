"""`scaletrain train` / `python -m scaletrain.train`: parse → validate → init → build → run.

Everything that can be wrong with the inputs (config keys and types, sizes that do not divide,
world size, tokenizer, data files, vocabulary) is checked before torch allocates a parameter or
megatron.core is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaletrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from scaletrain.checkpoint.resume import keep_recorded_vocab
from scaletrain.config import ConfigError, RunConfig, dump_config, load_config, resolve_model, validate
from scaletrain.config.load import config_to_dict
from scaletrain.config.validate import uses_pretraining_data
from scaletrain.data.indexed import DatasetError
from scaletrain.data.tokenizer import load_tokenizer
from scaletrain.distributed import ParallelDims, init_distributed, read_env, shutdown_distributed
from scaletrain.nn.backend import select_backend
from scaletrain.nn.fused import check_available, expand
from scaletrain.posttrain.chat import chat_template_origin
from scaletrain.posttrain.frozen import check_frozen_model, teacher_vocab
from scaletrain.profile.memory_check import memory_problem
from scaletrain.trainer.divergence import EXIT_DIVERGED, DivergenceError
from scaletrain.trainer.flops import parameter_counts
from scaletrain.trainer.optimizer import optimizer_problem
from scaletrain.trainer.precision import resolve_precision
from scaletrain.trainer.stop import EXIT_INTERRUPTED, StopRequest, exit_code

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run file (TOML), e.g. configs/tiny.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set parallel.tp=2 (repeatable)")


def prepare(cfg: RunConfig, world_size: int):
    """Resolve derived sizes and run every up-front check. Returns (cfg, dp, tokenizer)."""
    from scaletrain.data.gpt import check_data

    if cfg.checkpoint.init_from_hf:
        from scaletrain.checkpoint.hf_checks import check_hf_weights, read_hf_config

        hf_dir = Path(cfg.checkpoint.init_from_hf)
        if not (hf_dir / "config.json").is_file():
            raise ConfigError(f"checkpoint.init_from_hf = {hf_dir}: no config.json there (a local Hugging Face "
                              "model directory is expected; nothing is downloaded).")
        # The HF model's architecture replaces [model]; its tokenizer is the default one. An explicit
        # model.max_position_embeddings still applies: fine-tuning at a longer context than the model had.
        hf_model = read_hf_config(hf_dir)
        check_hf_weights(hf_dir, hf_model)  # safetensors headers only
        if cfg.model.max_position_embeddings:
            hf_model = dataclasses.replace(hf_model, max_position_embeddings=cfg.model.max_position_embeddings)
        if cfg.model.num_labels and not hf_model.num_labels:  # a reward model from a causal LM's body
            hf_model = dataclasses.replace(hf_model, num_labels=cfg.model.num_labels)
        cfg = dataclasses.replace(cfg, model=hf_model,
                                  data=dataclasses.replace(cfg.data, tokenizer=cfg.data.tokenizer or str(hf_dir)))
    if cfg.posttrain.objective == "reward" and not cfg.model.num_labels:  # 0 = derive: one score per conversation
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_labels=1))
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty: point it at the tokenizer that wrote the data "
                          "(a folder with tokenizer.model or tokenizer.json).")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.posttrain.objective == "distill" and cfg.posttrain.teacher and not cfg.model.vocab_size:
        # 0 = derive: the teacher's (padded) size, so that both logit tensors shard over tp alike.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=teacher_vocab(cfg)))
    cfg = keep_recorded_vocab(cfg)  # a resumed run keeps the vocabulary its first start derived, at any layout
    model = resolve_model(cfg.model, tokenizer_vocab=tokenizer.vocab_size, tp=cfg.parallel.tp,
                          seq_length=cfg.train.seq_length)
    cfg = dataclasses.replace(cfg, model=model)
    dp = validate(cfg, world_size)
    problem = check_available(cfg.parallel.kernels, device_type(cfg)) or optimizer_problem(cfg.optim, device_type(cfg))
    if problem:
        raise ConfigError(problem)
    try:  # te refused where it cannot run, before any process group or data exists
        backend, _ = select_backend(cfg.parallel.backend, tuple(cfg.parallel.kernels))
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    if backend == "te" and cfg.parallel.compile:
        raise ConfigError("parallel.compile on the te backend: Transformer Engine's modules are not traced by "
                          "torch.compile here (unverified without GPUs); set parallel.backend = 'torch' or "
                          "parallel.compile = false.")
    if backend == "te" and cfg.parallel.cp > 1:
        raise ConfigError(f"parallel.cp = {cfg.parallel.cp} on the te backend: Transformer Engine's context-parallel "
                          "attention is not wired up yet (its group binding is unverified without GPUs); set "
                          "parallel.backend = 'torch' or parallel.cp = 1.")
    if model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size = {model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens; set model.vocab_size = 0 to derive it.")
    if cfg.posttrain.objective in ("grpo", "ppo") and "reward_model" in cfg.posttrain.rewards:
        check_frozen_model(cfg, "posttrain.reward_model", cfg.posttrain.reward_model, role="reward",
                           tokenizer_vocab=tokenizer.vocab_size)
    if cfg.posttrain.objective == "ppo":
        check_frozen_model(cfg, "posttrain.critic", cfg.posttrain.critic or cfg.posttrain.reward_model, role="critic",
                           tokenizer_vocab=tokenizer.vocab_size)
    if cfg.posttrain.objective == "distill":
        check_frozen_model(cfg, "posttrain.teacher", cfg.posttrain.teacher, role="teacher",
                           tokenizer_vocab=tokenizer.vocab_size)
    for spec in cfg.train.eval_tasks:  # downstream tasks at validations: read and rendered now, not at step N
        from scaletrain.evaluation.command import _answer_prompts
        from scaletrain.evaluation.tasks import parse_task

        try:
            task = parse_task(spec, cfg.train.eval_task_limit or None)
            if task.kind in ("answer", "refusal"):
                _answer_prompts(task, tokenizer, cfg.posttrain.chat_template, cfg.train.seq_length,
                                cfg.train.eval_max_new_tokens)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ConfigError(f"train.eval_tasks: {e}") from None
        if model.num_labels and task.kind != "preference":
            raise ConfigError(f"train.eval_tasks: {task.name} needs token probabilities; a reward model evaluates on "
                              "preference tasks only")
    if uses_pretraining_data(cfg):
        check_data(cfg.data, model_vocab=model.vocab_size, tokenizer_vocab=tokenizer.vocab_size,
                   tokenizer_sha256=tokenizer.fingerprint())
    else:
        missing = [f for f in (*cfg.posttrain.train_data, *cfg.posttrain.valid_data) if not Path(f).is_file()]
        if missing:
            raise ConfigError(f"posttrain data file(s) not found: {', '.join(missing)}")
    problem = memory_problem(cfg, world_size, device_type(cfg), read_env().local_rank)  # before any allocation
    if problem:
        raise ConfigError(problem)
    return cfg, dp, tokenizer


def build_preference_datasets(cfg: RunConfig, tokenizer, log):
    """Padded preference-pair datasets (train, valid or None) with globally unique pair indices."""
    from scaletrain.posttrain.chat import ChatRenderer
    from scaletrain.posttrain.dpo_data import PreferenceDataset, read_pairs
    from scaletrain.posttrain.tools import bundled_tools

    pt = cfg.posttrain
    renderer = ChatRenderer(tokenizer, pt.chat_template, "assistant", bundled_tools(pt.tools))
    reward = pt.objective == "reward"
    train = PreferenceDataset(read_pairs(pt.train_data), renderer, tokenizer, cfg.train.seq_length, always_eos=reward)
    log(train.report.line())
    valid = None
    if pt.valid_data:
        valid = PreferenceDataset(read_pairs(pt.valid_data), renderer, tokenizer, cfg.train.seq_length,
                                  index_offset=len(train), always_eos=reward)
        log("validation " + valid.report.line())
    return train, valid


def build_sft_datasets(cfg: RunConfig, tokenizer, log):
    """Rendered, masked, packed SFT datasets (train, valid or None); the report goes to the log."""
    from scaletrain.posttrain.chat import ChatRenderer
    from scaletrain.posttrain.sft_data import SFTDataset, read_conversations
    from scaletrain.posttrain.tools import bundled_tools

    pt = cfg.posttrain
    renderer = ChatRenderer(tokenizer, pt.chat_template, pt.loss_on, bundled_tools(pt.tools))
    out: list[SFTDataset | None] = []
    for files in (pt.train_data, pt.valid_data):
        if not files:
            out.append(None)
            continue
        ds = SFTDataset(read_conversations(files), renderer, tokenizer, cfg.train.seq_length,
                        packing=pt.packing, over_length=pt.over_length)
        log(ds.report.line() + f" → {len(ds)} rows of {cfg.train.seq_length} tokens")
        out.append(ds)
    return out[0], out[1]


def build_distill_datasets(cfg: RunConfig, tokenizer, log):
    """Distillation on chat rows: packed SFT rows (train, valid); on-policy, the train rows are prompts
    the student completes and the validation rows stay teacher-forced conversations."""
    if not cfg.posttrain.distill_on_policy:
        return build_sft_datasets(cfg, tokenizer, log)
    train, _ = build_prompt_datasets(cfg, tokenizer, log, rewards=())
    no_train = dataclasses.replace(cfg, posttrain=dataclasses.replace(cfg.posttrain, train_data=()))
    return train, build_sft_datasets(no_train, tokenizer, log)[1]


def build_prompt_datasets(cfg: RunConfig, tokenizer, log, rewards: tuple[str, ...] | None = None):
    """GRPO prompts (train, valid or None): rendered generation prompts with their rows, checked for the
    fields the rewards read (default posttrain.rewards) before any parameter exists."""
    from scaletrain.posttrain.chat import ChatRenderer
    from scaletrain.posttrain.grpo_data import PromptDataset, read_prompt_rows
    from scaletrain.posttrain.rewards import required_fields
    from scaletrain.posttrain.tools import bundled_tools

    pt = cfg.posttrain
    renderer = ChatRenderer(tokenizer, pt.chat_template, "assistant", bundled_tools(pt.tools))
    out: list[PromptDataset | None] = []
    for files in (pt.train_data, pt.valid_data):
        if not files:
            out.append(None)
            continue
        ds = PromptDataset(read_prompt_rows(files), renderer, seq_length=cfg.train.seq_length,
                           max_new_tokens=pt.max_new_tokens)
        for name in pt.rewards if rewards is None else rewards:
            for key in required_fields(name):
                missing = sum(1 for row in ds.rows if row.get(key) is None)
                if missing:
                    raise ConfigError(f"posttrain.rewards: '{name}' reads the `{key}` field, which {missing} of "
                                      f"{len(ds.rows)} prompt rows of {', '.join(files)} lack.")
        log(("validation " if out else "") + ds.report.line())
        out.append(ds)
    return out[0], out[1]


def rollout_batches(cfg: RunConfig, prompts, tokenizer, *, model, reference, dims, precision, device,
                    consumed_samples: int, fused_cross_entropy: bool, reward_scorer=None, **ppo):
    """GRPO's train_batches: fresh rollouts per step (posttrain/grpo_batches.py); given PPO's critic
    settings (`build_critic`), PPO's (posttrain/ppo_batches.py)."""
    from scaletrain.posttrain.chat import ChatRenderer
    from scaletrain.posttrain.grpo_batches import RolloutBatches
    from scaletrain.posttrain.ppo_batches import PPOBatches
    from scaletrain.posttrain.rewards import resolve_reward, sandbox_settings

    pt, t = cfg.posttrain, cfg.train
    # The template's end-of-turn marker ends a completion (and is learnt, like eos).
    marker = ChatRenderer(tokenizer, pt.chat_template).end_of_turn()
    cls: Any = PPOBatches if ppo else RolloutBatches
    return cls(
        prompts, model=model, reference=reference, dims=dims,
        rewards={n: reward_scorer if n == "reward_model" else resolve_reward(n, sandbox_settings(pt)) for n in pt.rewards},
        reward_weights=pt.reward_weights, group_size=pt.group_size, max_new_tokens=pt.max_new_tokens,
        temperature=pt.temperature, scale_rewards=pt.scale_rewards, global_batch=t.global_batch_size,
        micro_batch=t.micro_batch_size, seq_length=t.seq_length, seed=t.seed, consumed_samples=consumed_samples,
        tokenizer=tokenizer, stop_text=marker, precision=precision, device=device,
        fused_cross_entropy=fused_cross_entropy, run_dir=Path(t.run_dir),
        width_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1, iterations=pt.grpo_iterations,
        missing_stop_penalty=pt.missing_stop_penalty, overlong_buffer=pt.overlong_buffer,
        overlong_penalty=pt.overlong_penalty, mask_truncated=pt.mask_truncated, dynamic_sampling=pt.dynamic_sampling,
        max_sampling_rounds=pt.max_sampling_rounds, rollout_micro_batch=pt.rollout_micro_batch or t.micro_batch_size,
        **ppo)


def build_critic(cfg: RunConfig, dims, precision, device, backend, run_dir: Path, resumed_step: int | None,
                 log) -> dict[str, Any]:
    """PPO's critic, trainable, in the policy's layout, with its AdamW: from posttrain.critic (or the reward
    model) on a first start, from run_dir/critic at the resumed step otherwise. Returns PPOBatches' settings."""
    from scaletrain.checkpoint.hf import load_hf_weights
    from scaletrain.checkpoint.io import stored_param_dtype
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters
    from scaletrain.parallel.parallelize import parallelize
    from scaletrain.posttrain.frozen import locate_model
    from scaletrain.posttrain.ppo_batches import load_critic_state
    from scaletrain.trainer.optimizer import build_optimizer

    pt = cfg.posttrain
    source = pt.critic or pt.reward_model
    kind, path, m = locate_model("posttrain.critic", source)
    m = dataclasses.replace(m, num_labels=1)
    with torch.device("meta") if dims.pp > 1 else torch.device(device):
        critic = build_model(m, tp_size=dims.tp, dtype=precision.param_dtype, backend=backend)
    critic = parallelize(critic, dims, dataclasses.replace(cfg.parallel, recompute="none"), device)
    init_parameters(critic, cfg.train.seed + 1, tp_rank=dims.tp_rank, tp_size=dims.tp)  # a fresh score head's start
    lr = pt.critic_lr or cfg.optim.lr
    optimizer = build_optimizer(critic, dataclasses.replace(cfg.optim, lr=lr, distributed=False), device, dims)
    if resumed_step is not None:
        log(f"critic: resumed from {load_critic_state(run_dir, resumed_step, critic, optimizer, dims)}")
    elif kind == "hf":
        fresh = load_hf_weights(critic, path, tp_rank=dims.tp_rank, tp_size=dims.tp)
        log(f"critic: {m.num_layers}L h{m.hidden_size} from {path}" + (" (a causal LM: fresh score head)" if fresh else ""))
    else:
        if stored_param_dtype(path) != precision.param_dtype:
            raise ConfigError(f"posttrain.critic = {path} was saved in {stored_param_dtype(path)}, the run trains in "
                              f"{precision.param_dtype}: export it (`scaletrain convert to-hf`) or match precision.dtype")
        load_checkpoint(path, critic, None, dims=dims)
        log(f"critic: {m.num_layers}L h{m.hidden_size} from {path}")
    return {"critic": critic, "critic_optimizer": optimizer, "critic_lr": lr, "clip_grad": cfg.optim.clip_grad,
            "kl_beta": pt.kl_beta, "gamma": pt.gae_gamma, "lam": pt.gae_lambda, "value_clip": pt.value_clip,
            "whiten_advantages": pt.whiten_advantages, "keep_last": cfg.checkpoint.keep_last,
            "model_config": dataclasses.asdict(m)}


def on_policy_batches(cfg: RunConfig, prompts, tokenizer, *, model, dims, precision, device, consumed_samples: int):
    """On-policy distillation's train_batches: the student's own completions per step (posttrain/distill_batches.py)."""
    from scaletrain.posttrain.chat import ChatRenderer
    from scaletrain.posttrain.distill_batches import OnPolicyBatches

    pt, t = cfg.posttrain, cfg.train
    return OnPolicyBatches(
        prompts, model=model, dims=dims, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
        seq_length=t.seq_length, seed=t.seed, consumed_samples=consumed_samples, tokenizer=tokenizer,
        stop_text=ChatRenderer(tokenizer, pt.chat_template).end_of_turn(), max_new_tokens=pt.max_new_tokens,
        temperature=pt.temperature, precision=precision, device=device,
        width_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1,
        rollout_micro_batch=pt.rollout_micro_batch or t.micro_batch_size)


def build_reward_scorer(cfg: RunConfig, tokenizer, dims, precision, device, backend, log):
    """GRPO's learned reward (RLHF): the reward model, frozen, in the policy's layout."""
    from scaletrain.posttrain.frozen import build_frozen_model
    from scaletrain.posttrain.reward_scorer import RewardModelScorer

    rm, line = build_frozen_model(cfg, "posttrain.reward_model", cfg.posttrain.reward_model, dims=dims,
                                  precision=precision, device=device, backend=backend)
    log(f"reward model: {line}")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return RewardModelScorer(rm, dims, pad_id=pad, eos_id=tokenizer.eos_id, micro_batch=cfg.train.micro_batch_size,
                             precision=precision, device=device,
                             width_multiple=cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)


REFERENCE_DIR = "reference"


def build_reference(cfg: RunConfig, dims, precision, device, backend, policy, run_dir: Path, log):
    """The frozen reference policy for GRPO's KL penalty: the same model in the same layout, without
    gradients. A run's first start copies the policy's starting weights into it and saves them
    under run_dir/reference (a checkpoint like any other); a resumed run loads them from there."""
    from scaletrain.models import build_model
    from scaletrain.parallel.parallelize import parallelize

    with torch.device("meta") if dims.pp > 1 else torch.device(device):
        ref = build_model(cfg.model, tp_size=dims.tp, dtype=precision.param_dtype, backend=backend)
    ref.requires_grad_(False)  # no gradient buffers, no dp buckets
    ref = parallelize(ref, dims, dataclasses.replace(cfg.parallel, recompute="none"), device)
    root = run_dir / REFERENCE_DIR
    saved = latest_checkpoint(root)
    if saved is not None:
        load_checkpoint(saved, ref, None, dims=dims)
        log(f"reference policy: loaded from {saved}")
    elif latest_checkpoint(run_dir / "checkpoints") is not None:
        raise CheckpointError(f"{root} is missing: a resumed GRPO run with posttrain.kl_beta > 0 needs the reference "
                              "policy saved at its first start; restore it or start a new run directory")
    else:
        ref.load_state_dict(policy.state_dict())
        path = save_checkpoint(root, 0, ref, None, {"model_config": dataclasses.asdict(cfg.model)}, dims=dims)
        log(f"reference policy: the starting weights, saved to {path}")
    ref.eval()
    return ref


def device_type(cfg: RunConfig) -> str:
    """'cuda' or 'cpu', by train.device ('auto': cuda where one is visible)."""
    return "cuda" if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu"


def _configure_runtime(cfg: RunConfig) -> torch.device:
    t = cfg.train
    threads = t.threads or (1 if t.deterministic else 0)
    if threads:
        torch.set_num_threads(threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    torch.manual_seed(t.seed)
    if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'.")
        return torch.device("cuda", read_env().local_rank)
    return torch.device("cpu")


def build_trainer(cfg: RunConfig, prepared: tuple | None = None):
    """Check, initialise and build everything a run needs; returns a Trainer (None: nothing left to do).

    The caller owns `trainer.sinks` and must close them.
    """
    from scaletrain.data.gpt import build_gpt_datasets
    from scaletrain.data.loader import StepBatches
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters
    from scaletrain.parallel.parallelize import parallelize
    from scaletrain.trainer.loop import LoopState, Trainer, set_rng_state
    from scaletrain.trainer.objective import LanguageModelingObjective
    from scaletrain.trainer.optimizer import build_optimizer
    from scaletrain.trainer.sinks import MetricSinks

    env = read_env()
    cfg, dp, tokenizer = prepared if prepared is not None else prepare(cfg, env.world_size)
    run_dir = Path(cfg.train.run_dir)
    ckpt_root = run_dir / "checkpoints"
    resume_from = Path(cfg.checkpoint.load) if cfg.checkpoint.load else latest_checkpoint(ckpt_root, warn=env.rank == 0)
    backend, backend_reason = select_backend(cfg.parallel.backend, tuple(cfg.parallel.kernels))
    device = _configure_runtime(cfg)
    precision = resolve_precision(cfg.precision, device)
    init_distributed(env, device.type, cfg.parallel.timeout_s)  # no-op when run() (or a harness) already did
    dims = ParallelDims.from_config(cfg.parallel, env.world_size, env.rank)

    run_dir.mkdir(parents=True, exist_ok=True)
    if dims.is_main:
        dump_config(cfg, run_dir / "config.toml")
    counts = parameter_counts(cfg.model)
    log = print if dims.is_main else (lambda *a, **k: None)
    # SFT data is rendered before any parameter exists: a bad file fails here, cheaply.
    post_datasets = {"sft": build_sft_datasets, "dpo": build_preference_datasets, "reward": build_preference_datasets,
                     "grpo": build_prompt_datasets, "ppo": build_prompt_datasets,
                     "distill": build_distill_datasets}.get(
        "pretrain" if uses_pretraining_data(cfg) else cfg.posttrain.objective, lambda *a: (None, None))(cfg, tokenizer, log)
    if not uses_pretraining_data(cfg):
        log(f"chat template: {chat_template_origin(cfg.posttrain, tokenizer)}")
    log(f"scaletrain: {cfg.model.family} {cfg.model.num_layers}L h{cfg.model.hidden_size} "
        f"({counts['total'] / 1e6:.2f}M params), vocab {cfg.model.vocab_size} (tokenizer {tokenizer.vocab_size}); "
        f"layout tp{dims.tp}·pp{dims.pp}·{f'cp{dims.cp}·' if dims.cp > 1 else ''}dp{dims.dp} ({env.world_size} processes via {env.launcher}); backend {backend} ({backend_reason}); "
        f"precision {precision.name} ({precision.reason}); device {device}")

    if dims.world_size > 1:
        from scaletrain.distributed.placement import describe_placement, gather_hosts

        line, warnings = describe_placement(dims, gather_hosts(dims))
        log(line)
        for w in warnings:
            log(f"warning: {w}")
    if dims.pp > 1:  # build on meta: each rank materialises only its own stage
        with torch.device("meta"):
            model = build_model(cfg.model, tp_size=dims.tp, dtype=precision.param_dtype, backend=backend)
    else:
        model = build_model(cfg.model, tp_size=dims.tp, dtype=precision.param_dtype, backend=backend).to(device)
    model = parallelize(model, dims, cfg.parallel, device, shard_optimizer=cfg.optim.distributed,
                        precision=cfg.precision, log=log)
    init_parameters(model, cfg.train.seed, tp_rank=dims.tp_rank, tp_size=dims.tp)
    if resume_from is None and cfg.checkpoint.init_from_hf:
        from scaletrain.checkpoint.hf import load_hf_weights

        fresh = load_hf_weights(model, cfg.checkpoint.init_from_hf, tp_rank=dims.tp_rank, tp_size=dims.tp)
        log(f"initialised from Hugging Face weights in {cfg.checkpoint.init_from_hf}"
            + (f" ({', '.join(fresh)} newly initialised: the HF model is a causal LM)" if fresh else ""))
    optimizer = build_optimizer(model, cfg.optim, device, dims)
    fused_ce = "cross_entropy" in expand(cfg.parallel.kernels)
    pt = cfg.posttrain
    if pt.objective == "sft":
        from scaletrain.posttrain.sft import SFTObjective

        objective: Any = SFTObjective(dims.tp_comm, fused_cross_entropy=fused_ce)
    elif pt.objective == "dpo":
        from scaletrain.posttrain.dpo import DPOObjective

        objective = DPOObjective(dims.tp_comm, pt.dpo_loss, pt.beta, pt.label_smoothing, pt.simpo_gamma,
                                 fused_cross_entropy=fused_ce, nll_weight=pt.nll_weight, cp=dims.comm("cp"))
    elif pt.objective == "reward":
        from scaletrain.posttrain.reward import RewardObjective

        objective = RewardObjective(margin=pt.reward_margin, center=pt.reward_center, cp=dims.comm("cp"))
    elif pt.objective in ("grpo", "ppo"):
        from scaletrain.posttrain.grpo import GRPOObjective

        # PPO: the KL penalty is in the per-token reward (posttrain/ppo.py), not in the loss; the
        # sampling-time log-probs are always at hand, so the ratio is clipped from the first update.
        ppo = pt.objective == "ppo"
        objective = GRPOObjective(dims.tp_comm, kl_beta=0.0 if ppo else pt.kl_beta, temperature=pt.temperature,
                                  loss_norm="token" if ppo else pt.grpo_loss_norm, fused_cross_entropy=fused_ce,
                                  clipped=ppo or pt.grpo_iterations > 1, clip_eps=pt.clip_eps,
                                  clip_eps_high=pt.clip_eps_high, cp=dims.comm("cp"))
    elif pt.objective == "distill":
        from scaletrain.posttrain.distill import DistillObjective
        from scaletrain.posttrain.frozen import build_frozen_model

        teacher, line = build_frozen_model(cfg, "posttrain.teacher", pt.teacher, dims=dims, precision=precision,
                                           device=device, backend=backend)
        log(f"teacher: {line}; {pt.distill_loss} at τ = {pt.distill_temperature}, α = {pt.distill_alpha}"
            + (f", its top {pt.distill_top_k} tokens per position" if pt.distill_top_k else ""))
        objective = DistillObjective(dims.tp_comm, teacher, dims, precision, kind=pt.distill_loss,
                                     temperature=pt.distill_temperature, alpha=pt.distill_alpha,
                                     top_k=pt.distill_top_k, vocab_limit=tokenizer.vocab_size,
                                     fused_cross_entropy=fused_ce)
    else:
        objective = LanguageModelingObjective(dims.tp_comm, fused_cross_entropy=fused_ce)
    if cfg.parallel.kernels:
        log(f"fused kernels: {', '.join(expand(cfg.parallel.kernels))}")

    state = LoopState(step=0, consumed_samples=0)
    if resume_from is not None:
        trainer_state = load_checkpoint(resume_from, model, optimizer, dims=dims)
        state = LoopState(step=int(trainer_state["step"]), consumed_samples=int(trainer_state["consumed_samples"]))
        if "rng" in trainer_state.get("rank_state", {}):
            set_rng_state(trainer_state["rank_state"]["rng"])
        log(f"resumed from {resume_from} at step {state.step} ({state.consumed_samples} samples consumed)")
    if pt.objective == "dpo" and objective.needs_reference:
        from scaletrain.posttrain.dpo import reference_logps

        reference_logps(objective, model, list(post_datasets), micro_batch=cfg.train.micro_batch_size, run_dir=run_dir,
                        dims=dims, precision=precision, device=device, resumed=resume_from is not None, log=log)
    if state.step >= cfg.train.steps:
        log(f"nothing to do: the run is at step {state.step} of train.steps = {cfg.train.steps}")
        return None

    t = cfg.train
    eval_points = (t.steps // t.eval_interval + 1) if t.eval_interval else 0
    if not uses_pretraining_data(cfg):
        train_ds, valid_ds = post_datasets
    else:
        train_ds, valid_ds = build_gpt_datasets(
            cfg.data, seq_length=t.seq_length, seed=t.seed, eod_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size,
            train_samples=t.steps * t.global_batch_size, valid_samples=eval_points * t.eval_iters * t.global_batch_size)
    train_batches: Any
    if pt.objective in ("grpo", "ppo"):
        reference = build_reference(cfg, dims, precision, device, backend, model, run_dir, log) if pt.kl_beta else None
        scorer = build_reward_scorer(cfg, tokenizer, dims, precision, device, backend, log) \
            if "reward_model" in pt.rewards else None
        if "python_tests" in pt.rewards:
            from scaletrain.posttrain.rewards import sandbox_settings
            from scaletrain.posttrain.sandbox import describe

            log(describe(sandbox_settings(pt)))
        extra: dict[str, Any] = {}
        if pt.objective == "ppo":
            extra = build_critic(cfg, dims, precision, device, backend, run_dir,
                                 state.step if resume_from is not None else None, log)
        train_batches = rollout_batches(cfg, train_ds, tokenizer, model=model, reference=reference, dims=dims,
                                        precision=precision, device=device, consumed_samples=state.consumed_samples,
                                        fused_cross_entropy=fused_ce, reward_scorer=scorer, **extra)
    elif pt.objective == "distill" and pt.distill_on_policy:
        train_batches = on_policy_batches(cfg, train_ds, tokenizer, model=model, dims=dims, precision=precision,
                                          device=device, consumed_samples=state.consumed_samples)
    else:
        train_batches = StepBatches(train_ds, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
                                    dp_rank=dims.dp_rank, dp_size=dims.dp, consumed_samples=state.consumed_samples,
                                    num_workers=cfg.data.num_workers)
    valid_fn: Any = None
    if valid_ds is not None and t.eval_interval:
        # The same validation batches every time, so validation losses compare across steps and runs.
        def valid_fn():
            return StepBatches(valid_ds, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
                               dp_rank=dims.dp_rank, dp_size=dims.dp, num_steps=t.eval_iters)

    sinks = MetricSinks(run_dir, cfg.logging, total_steps=t.steps, start_step=state.step,
                        run_config=config_to_dict(cfg), active=dims.is_main,
                        console_keys=tuple(getattr(objective, "metrics", ())) + tuple(getattr(train_batches, "console_keys", ())))
    validator: Any = None
    if pt.objective in ("grpo", "ppo") and valid_ds is not None and t.eval_interval:
        def held_out_rewards():  # of greedy completions (posttrain/grpo_batches.py); no validation loss
            return None, train_batches.evaluate(valid_ds)
        validator, valid_fn = held_out_rewards, None
    trainer = Trainer(cfg, model=model, optimizer=optimizer, objective=objective, train_batches=train_batches,
                      valid_batches_fn=valid_fn, precision=precision, device=device, sinks=sinks,
                      run_dir=run_dir, state=state, dims=dims, validator=validator)
    if t.eval_tasks:
        from scaletrain.evaluation.during_training import DownstreamEval

        trainer.downstream = DownstreamEval(cfg, tokenizer, model, dims, precision, device)
    return trainer


def run(cfg: RunConfig) -> str:
    """Train according to a loaded config; returns 'done', 'exit' (exit interval), 'stopped' (a stop
    signal: checkpointed, to be requeued) or 'interrupted' (SIGINT: checkpointed)."""
    env = read_env()
    prepared = prepare(cfg, env.world_size)  # every input check happens before any process group exists
    # Installed before any slow start-up work, so that a signal then is honoured at the first step boundary.
    stop = StopRequest(cfg.train.stop_signals, rank=env.rank)
    try:
        owns_group = init_distributed(env, device_type(cfg), cfg.parallel.timeout_s)
        try:
            trainer = build_trainer(cfg, prepared)
            result = "done"  # None: the run had already finished (an export may still be missing)
            if trainer is not None:
                trainer.stop = stop
                try:
                    result = trainer.run()
                finally:
                    trainer.sinks.close()
        finally:
            if owns_group:
                shutdown_distributed()
    finally:
        stop.close()
    if result == "done" and cfg.checkpoint.export_hf and env.rank == 0:
        export_final(cfg)
    return result


def export_final(cfg: RunConfig) -> Path:
    """checkpoint.export_hf: the final checkpoint → a Hugging Face directory, on rank 0 after the process
    group is gone (no peer waits on it; the full model is assembled in CPU memory, as `convert to-hf`)."""
    from scaletrain.checkpoint.hf import export_to_hf

    run_dir = Path(cfg.train.run_dir)
    out = Path(cfg.checkpoint.export_hf)
    out = out if out.is_absolute() else run_dir / out
    export_to_hf(run_dir / "checkpoints", out)
    print(f"exported the final checkpoint to Hugging Face format: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaletrain train", description="Pretrain a model from a run file.")
    add_train_args(parser)
    args = parser.parse_args(argv)
    return train_command(args)


def write_exit_status(code: int) -> None:
    """Rank 0 records its exit code in $SCALETRAIN_EXIT_STATUS_FILE when a launch script asks for it:
    torchrun reports any failing worker as exit 1, so the requeue code would otherwise be lost."""
    path = os.environ.get("SCALETRAIN_EXIT_STATUS_FILE")
    if path and read_env().rank == 0:
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(f"{code}\n")
        os.replace(tmp, path)


def train_command(args: argparse.Namespace, objective: str | None = None) -> int:
    """`scaletrain train` (objective from the config) or a stage command (`scaletrain sft`)."""
    try:
        overrides = list(args.overrides) + ([f"posttrain.objective={objective}"] if objective else [])
        cfg = load_config(args.config, overrides)
        outcome = run(cfg)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        write_exit_status(EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except DivergenceError as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        write_exit_status(EXIT_DIVERGED)
        return EXIT_DIVERGED
    except KeyboardInterrupt:  # a second Ctrl-C (or one before the handler was installed)
        print("scaletrain: interrupted: stopped at once, without a checkpoint", file=sys.stderr)
        write_exit_status(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    code = exit_code(outcome)
    write_exit_status(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
