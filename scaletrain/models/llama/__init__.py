"""Llama family (Llama 2/3, Qwen2-style qkv bias, Mistral)."""

from scaletrain.models.llama.model import LlamaModel

__all__ = ["LlamaModel"]
