"""Frozen companion models of a run — GRPO's reward model, a distillation teacher: found on disk,
checked against the run's layout and tokenizer before anything is allocated, and built in the
run's own layout (tp, pp, SP) without gradients.

A companion is given as a Hugging Face directory (config.json + safetensors) or as scaletrain
output: a checkpoint, a checkpoints folder (its latest) or a run directory (its latest checkpoint).
Its architecture is its own (a teacher is usually larger than its student); what must agree with
the run is listed per use in `check_frozen_model`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from scaletrain.config import ConfigError, RunConfig
from scaletrain.config.schema import ModelConfig


def locate_model(key: str, path_text: str) -> tuple[str, Path, ModelConfig]:
    """The model `key` (a config key, for messages) names → ('hf' | 'checkpoint', path, its ModelConfig)."""
    from scaletrain.checkpoint import latest_checkpoint
    from scaletrain.checkpoint.hf import checkpoint_model_config
    from scaletrain.checkpoint.hf_checks import HFModelError, read_hf_config
    from scaletrain.checkpoint.io import STATE_FILE
    from scaletrain.models.llama.hf import UnsupportedModelError

    path = Path(path_text)
    if (path / "config.json").is_file():
        try:
            return "hf", path, read_hf_config(path)
        except (UnsupportedModelError, HFModelError) as e:
            raise ConfigError(f"{key} = {path}: {e}") from None
    for candidate in (path if (path / STATE_FILE).is_file() else None, latest_checkpoint(path),
                      latest_checkpoint(path / "checkpoints")):
        if candidate is not None:
            return "checkpoint", candidate, checkpoint_model_config(candidate)
    raise ConfigError(f"{key} = {path}: neither a Hugging Face directory (config.json) nor a "
                      "checkpoint, checkpoints folder or run directory with one.")


def check_frozen_model(cfg: RunConfig, key: str, path_text: str, *, role: str, tokenizer_vocab: int) -> ModelConfig:
    """Every reason the model cannot serve as `role` ('reward' or 'teacher') of this run, at once."""
    _kind, path, m = locate_model(key, path_text)
    p, problems = cfg.parallel, []
    if role == "reward" and m.num_labels != 1:
        problems.append(f"it has {'no score head (a language model)' if not m.num_labels else f'{m.num_labels} labels'}; "
                        "train one with `scaletrain reward` (model.num_labels = 1)")
    if role == "critic" and m.num_labels not in (0, 1):
        problems.append(f"it has {m.num_labels} labels; a critic starts from a reward model (1) or a causal LM")
    if role == "teacher" and m.num_labels:
        problems.append("it is a reward model (a score head, no token logits); a teacher must be a causal LM")
    if m.num_heads % p.tp or m.num_kv_heads % p.tp:
        problems.append(f"its {m.num_heads} heads / {m.num_kv_heads} kv heads do not divide over parallel.tp = {p.tp}")
    if m.num_layers % (p.pp * p.vpp):
        problems.append(f"its {m.num_layers} layers do not divide over parallel.pp·vpp = {p.pp * p.vpp}")
    if m.vocab_size < tokenizer_vocab:
        problems.append(f"its vocabulary ({m.vocab_size}) is smaller than the tokenizer's ({tokenizer_vocab}): "
                        f"it must share the {'policy' if role == 'reward' else 'student'}'s tokenizer")
    elif role == "teacher" and m.vocab_size != cfg.model.vocab_size:
        # Both logit tensors are sharded over tp the same way only when the (padded) sizes agree.
        problems.append(f"its vocabulary has {m.vocab_size} rows and the student's {cfg.model.vocab_size}; set "
                        f"model.vocab_size = {m.vocab_size} (or 0, which takes the teacher's)")
    elif m.vocab_size % p.tp:
        problems.append(f"its vocabulary ({m.vocab_size}) does not divide over parallel.tp = {p.tp}")
    if m.max_position_embeddings and m.max_position_embeddings < cfg.train.seq_length:
        problems.append(f"it reads at most {m.max_position_embeddings} positions < train.seq_length = {cfg.train.seq_length}")
    if problems:
        raise ConfigError(f"{key} = {path}: " + "; ".join(problems) + ".")
    return m


def build_frozen_model(cfg: RunConfig, key: str, path_text: str, *, dims, precision, device: torch.device,
                       backend: str) -> tuple[torch.nn.Module, str]:
    """The model, loaded, frozen and in eval mode, in the run's layout; and a line for the log."""
    from scaletrain.checkpoint import load_checkpoint
    from scaletrain.checkpoint.hf import load_hf_weights
    from scaletrain.checkpoint.io import stored_param_dtype
    from scaletrain.models import build_model
    from scaletrain.parallel.parallelize import parallelize

    kind, path, m = locate_model(key, path_text)
    # A checkpoint loads in the dtype it was saved in (checked strictly), then runs in the run's.
    dtype = precision.param_dtype if kind == "hf" else stored_param_dtype(path)
    with torch.device("meta") if dims.pp > 1 else torch.device(device):
        model = build_model(m, tp_size=dims.tp, dtype=dtype, backend=backend)
    model.requires_grad_(False)  # no gradient buffers, no dp buckets
    model = parallelize(model, dims, dataclasses.replace(cfg.parallel, recompute="none"), device)
    if kind == "hf":
        load_hf_weights(model, path, tp_rank=dims.tp_rank, tp_size=dims.tp)
    else:
        load_checkpoint(path, model, None, dims=dims)
        model.to(precision.param_dtype)
    model.eval()
    return model, f"{m.num_layers}L h{m.hidden_size} from {path} ({kind}), frozen, in the run's layout"


def teacher_vocab(cfg: RunConfig) -> Any:
    """The teacher's vocabulary size (for a student whose model.vocab_size is 0, i.e. derived)."""
    return locate_model("posttrain.teacher", cfg.posttrain.teacher)[2].vocab_size


def model_files(path: str) -> tuple[str, ModelConfig, Path, str]:
    """(kind, ModelConfig, tokenizer directory, chat template setting) of a model given on the command line:
    an HF directory (its own tokenizer and template) or scaletrain output (the checkpoint's tokenizer copy,
    the run's posttrain.chat_template from its config.toml)."""
    kind, where, m = locate_model("model", path)
    if kind == "hf":
        return kind, m, where, "auto"
    template = "auto"
    run_config = where.parent.parent / "config.toml"
    if run_config.is_file():
        from scaletrain.config.load import load_config

        template = load_config(run_config).posttrain.chat_template
    if not (where / "tokenizer").is_dir():
        raise FileNotFoundError(f"{where} holds no tokenizer/ folder: the tokenizer it trained with is needed")
    return kind, m, where / "tokenizer", template


@contextlib.contextmanager
def frozen_runtime(cfg: RunConfig) -> Iterator[tuple[Any, Any, torch.device, str]]:
    """(dims, precision, device, backend) for commands that only run frozen models (eval, rlaif): the
    run's runtime settings (threads, seed, device), the process group for the launch (torn down on
    exit if this call created it) and the layout of cfg.parallel."""
    from scaletrain.build import _configure_runtime, device_type
    from scaletrain.distributed import ParallelDims, init_distributed, read_env, shutdown_distributed
    from scaletrain.nn.backend import select_backend
    from scaletrain.trainer.precision import resolve_precision

    env = read_env()
    device = _configure_runtime(cfg)
    owns = init_distributed(env, device_type(cfg), cfg.parallel.timeout_s)
    try:
        dims = ParallelDims.from_config(cfg.parallel, env.world_size, env.rank)
        yield dims, resolve_precision(cfg.precision, device), device, select_backend(cfg.parallel.backend, ())[0]
    finally:
        if owns:
            shutdown_distributed()
