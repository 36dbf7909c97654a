"""Checkpoints: atomic DCP save/load in safetensors at any layout (global shapes), choosing the one to
resume, Hugging Face import and the key-map driver, integrity checks."""

from scaletrain.checkpoint.files import CheckpointError, read_trainer_state
from scaletrain.checkpoint.load import load_checkpoint
from scaletrain.checkpoint.save import save_checkpoint
from scaletrain.checkpoint.select import latest_checkpoint

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "read_trainer_state", "save_checkpoint"]
