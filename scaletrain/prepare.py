"""Everything that can be wrong with a run's inputs, checked before a process group, a parameter or a
dataset index exists: config keys, types and cross-field rules (the generic ones in config/validate.py,
the stage's own from its `Stage`), world size, backend, tokenizer, data files, vocabulary, companion
models on disk, evaluation tasks, memory. Stage-agnostic: what differs per stage comes from the registry.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from scaletrain.checkpoint.atomic_dir import check_replaceable
from scaletrain.checkpoint.hf_checks import check_hf_weights, read_hf_config
from scaletrain.checkpoint.resume import keep_recorded_vocab
from scaletrain.config import ConfigError, RunConfig, resolve_model, validate
from scaletrain.data.gpt import check_data
from scaletrain.data.tokenizer import Tokenizer, load_tokenizer
from scaletrain.distributed import read_env
from scaletrain.evaluation.runner import answer_prompts
from scaletrain.evaluation.tasks import parse_task
from scaletrain.model_builder import check_companion
from scaletrain.nn.backend import select_backend
from scaletrain.nn.fused import check_available
from scaletrain.profile.memory_check import memory_problem
from scaletrain.runtime import device_type
from scaletrain.stages.registry import get_stage
from scaletrain.stages.stage import Stage
from scaletrain.trainer.optimizer import optimizer_problem


def check_config(cfg: RunConfig, world_size: int) -> int:
    """Every config rule of a resolved config at `world_size` — generic and the stage's — at once; returns dp."""
    return validate(cfg, world_size, get_stage(cfg.posttrain.objective))


def _from_hf(cfg: RunConfig) -> RunConfig:
    """checkpoint.init_from_hf: the HF model's architecture replaces [model]; its tokenizer is the default one.
    An explicit model.max_position_embeddings still applies (fine-tuning at a longer context than the model had)."""
    hf_dir = Path(cfg.checkpoint.init_from_hf)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"checkpoint.init_from_hf = {hf_dir}: no config.json there (a local Hugging Face "
                          "model directory is expected; nothing is downloaded).")
    hf_model = read_hf_config(hf_dir)
    check_hf_weights(hf_dir, hf_model)  # safetensors headers only
    if cfg.model.max_position_embeddings:
        hf_model = dataclasses.replace(hf_model, max_position_embeddings=cfg.model.max_position_embeddings)
    if cfg.model.num_labels and not hf_model.num_labels:  # a reward model from a causal LM's body
        hf_model = dataclasses.replace(hf_model, num_labels=cfg.model.num_labels)
    return dataclasses.replace(cfg, model=hf_model,
                               data=dataclasses.replace(cfg.data, tokenizer=cfg.data.tokenizer or str(hf_dir)))


def _check_backend(cfg: RunConfig) -> None:
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


def _check_eval_tasks(cfg: RunConfig, tokenizer: Tokenizer) -> None:
    """train.eval_tasks run at validations: read and rendered now, not at step N."""
    for spec in cfg.train.eval_tasks:
        try:
            task = parse_task(spec, cfg.train.eval_task_limit or None)
            if task.kind in ("answer", "refusal"):
                answer_prompts(task, tokenizer, cfg.posttrain.chat.template, cfg.train.seq_length,
                               cfg.train.eval_max_new_tokens)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ConfigError(f"train.eval_tasks: {e}") from None
        if cfg.model.num_labels and task.kind != "preference":
            raise ConfigError(f"train.eval_tasks: {task.name} needs token probabilities; a reward model evaluates on "
                              "preference tasks only")


def _check_data(cfg: RunConfig, stage: Stage, tokenizer: Tokenizer) -> None:
    if stage.reads_documents(cfg):
        check_data(cfg.data, model_vocab=cfg.model.vocab_size, tokenizer_vocab=tokenizer.vocab_size,
                   tokenizer_sha256=tokenizer.fingerprint())
        return
    missing = [f for f in (*cfg.posttrain.chat.train_data, *cfg.posttrain.chat.valid_data) if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"posttrain data file(s) not found: {', '.join(missing)}")


def _check_export_target(cfg: RunConfig) -> None:
    """checkpoint.export_hf replaces its directory as a whole at the end of the run: a directory that is
    neither empty nor an earlier HF export is refused now, not after hours of training."""
    if cfg.checkpoint.export_hf:
        try:
            check_replaceable(Path(cfg.checkpoint.export_hf).absolute(), "config.json")
        except FileExistsError as e:
            raise ConfigError(f"checkpoint.export_hf: {e}") from None


def prepare(cfg: RunConfig, world_size: int) -> tuple[RunConfig, int, Tokenizer]:
    """Resolve derived sizes and run every up-front check. Returns (cfg, dp, tokenizer)."""
    stage = get_stage(cfg.posttrain.objective)
    if cfg.checkpoint.init_from_hf:
        cfg = _from_hf(cfg)
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty: point it at the tokenizer that wrote the data "
                          "(a folder with tokenizer.model or tokenizer.json).")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = stage.derive(cfg)  # e.g. a reward model's score head, a student's vocabulary from its teacher
    cfg = keep_recorded_vocab(cfg)  # a resumed run keeps the vocabulary its first start derived, at any layout
    model = resolve_model(cfg.model, tokenizer_vocab=tokenizer.vocab_size, tp=cfg.parallel.tp,
                          seq_length=cfg.train.seq_length)
    cfg = dataclasses.replace(cfg, model=model)
    dp = validate(cfg, world_size, stage)
    _check_backend(cfg)
    if model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size = {model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens; set model.vocab_size = 0 to derive it.")
    for c in stage.companions(cfg):
        check_companion(cfg, c.key, c.path, role=c.role, tokenizer_vocab=tokenizer.vocab_size)
    _check_eval_tasks(cfg, tokenizer)
    _check_data(cfg, stage, tokenizer)
    _check_export_target(cfg)
    problem = memory_problem(cfg, world_size, device_type(cfg), read_env().local_rank,
                             rollout_group=stage.rollout_group(cfg))  # before any allocation
    if problem:
        raise ConfigError(problem)
    return cfg, dp, tokenizer
