"""What a resumed run takes from the checkpoint it resumes, before anything is derived again.

A derived size (`model.vocab_size = 0`) is fixed at the run's first start and recorded in every
checkpoint (`trainer_state.json` → model_config) and in the run's resolved config.toml. On resume it is
read back from the checkpoint, whatever layout the run resumes at, so the tensors it saved fit again —
never derived anew from the tokenizer and the current layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from scaletrain.checkpoint.files import CheckpointError, read_trainer_state
from scaletrain.checkpoint.select import latest_checkpoint
from scaletrain.config.load import ConfigError
from scaletrain.config.schema import RunConfig


def resume_checkpoint(cfg: RunConfig) -> Path | None:
    """The checkpoint this run starts from: checkpoint.load, else the run directory's latest (None: a first start)."""
    if cfg.checkpoint.load:
        return Path(cfg.checkpoint.load)
    return latest_checkpoint(Path(cfg.train.run_dir) / "checkpoints")


def keep_recorded_vocab(cfg: RunConfig) -> RunConfig:
    """cfg with model.vocab_size = 0 replaced by the size recorded in the checkpoint the run resumes from
    (unchanged on a first start, or where the size is given)."""
    if cfg.model.vocab_size:
        return cfg
    try:
        path = resume_checkpoint(cfg)
        recorded = (read_trainer_state(path).get("model_config") or {}).get("vocab_size") if path else None
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if not recorded:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=int(recorded)))
