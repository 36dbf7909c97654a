"""scaletrain: a Megatron-style trainer for large language models on plain PyTorch (and Transformer Engine)."""

__version__ = "0.1.0"
