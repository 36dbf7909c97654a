"""Typed run configuration: schema, strict loading, validation."""

from scaletrain.config.load import ConfigError, config_to_dict, dump_config, load_config
from scaletrain.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
)
from scaletrain.config.validate import resolve_model, validate

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "PrecisionConfig", "RunConfig", "TrainConfig", "config_to_dict", "dump_config",
    "load_config", "resolve_model", "validate",
]
