"""Checkpoints: atomic DCP save/load in safetensors, resume state."""

from scaletrain.checkpoint.io import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "read_trainer_state", "save_checkpoint"]
