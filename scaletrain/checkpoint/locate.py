"""Models named on the command line or in a config: a Hugging Face directory, or scaletrain output (a
checkpoint, a checkpoints folder — its latest — or a run directory — its latest checkpoint)."""

from __future__ import annotations

from pathlib import Path

from scaletrain.checkpoint.files import STATE_FILE
from scaletrain.checkpoint.hf import checkpoint_model_config
from scaletrain.checkpoint.hf_checks import HFModelError, read_hf_config
from scaletrain.checkpoint.select import latest_checkpoint
from scaletrain.config.load import ConfigError, load_config
from scaletrain.config.schema import ModelConfig
from scaletrain.models.llama.hf import UnsupportedModelError


def locate_model(key: str, path_text: str) -> tuple[str, Path, ModelConfig]:
    """The model `key` (a config key, for messages) names → ('hf' | 'checkpoint', path, its ModelConfig)."""
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


def model_files(path: str) -> tuple[str, ModelConfig, Path, str]:
    """(kind, ModelConfig, tokenizer directory, chat template setting) of a model given on the command line:
    an HF directory (its own tokenizer and template) or scaletrain output (the checkpoint's tokenizer copy,
    the run's posttrain.chat.template from its config.toml)."""
    kind, where, m = locate_model("model", path)
    if kind == "hf":
        return kind, m, where, "auto"
    template = "auto"
    run_config = where.parent.parent / "config.toml"
    if run_config.is_file():
        template = load_config(run_config).posttrain.chat.template
    if not (where / "tokenizer").is_dir():
        raise FileNotFoundError(f"{where} holds no tokenizer/ folder: the tokenizer it trained with is needed")
    return kind, m, where / "tokenizer", template
