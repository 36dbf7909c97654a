"""Up-front checks of a local Hugging Face model directory, before any tensor is read or allocated.

`config_from_hf` maps a config.json it trusts; here a config.json that is not JSON, lacks a field the
architecture needs, or disagrees with the tensors beside it, and a truncated or corrupt safetensors
file, each become a ValueError naming the file and the problem — not a KeyError, a size-mismatch
RuntimeError deep in `load_state_dict`, or a SafetensorError. The weights are checked from their
headers only: the expected shape of every HF tensor comes from converting a model built on the
meta device (no memory) with the family's own key map.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from scaletrain.config.schema import ModelConfig
from scaletrain.models import build_model
from scaletrain.models.llama.hf import config_from_hf, to_hf_state_dict


class HFModelError(ValueError):
    """A Hugging Face directory that cannot be converted; the message names the file and the fix."""


def read_hf_config(hf_dir: str | Path) -> ModelConfig:
    """The ModelConfig of `hf_dir`/config.json; raises HFModelError (or UnsupportedModelError)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{Path(hf_dir)} has no config.json: not a Hugging Face model directory.")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise HFModelError(f"{path} is not valid JSON ({e}); fix or re-download it.") from None
    if not isinstance(raw, dict):
        raise HFModelError(f"{path} holds no JSON object.")
    try:
        return config_from_hf(raw)
    except KeyError as e:
        raise HFModelError(f"{path} has no {e.args[0]!r}, which the architecture needs; it is incomplete — "
                           "restore it from the model's source.") from None
    except (TypeError, AttributeError) as e:  # e.g. a number stored as a string or list
        raise HFModelError(f"{path} holds a field of the wrong type ({e}); compare it with the model's "
                           "source.") from None


def _stored_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """HF tensor name → (shape, file), from the safetensors headers; unreadable files are named."""
    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    out[key] = (tuple(fh.get_slice(key).get_shape()), f)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise HFModelError(f"{f} cannot be read ({e}); it is truncated or corrupt — copy or download it "
                               "again.") from None
    return out


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor a model of `cfg` has, through the family's key map on meta tensors."""
    try:
        with torch.device("meta"):
            model = build_model(cfg)
        return {k: tuple(v.shape) for k, v in to_hf_state_dict(dict(model.state_dict()), cfg).items()}
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        raise HFModelError(f"the config.json describes no model that can be built ({e}); compare it with the "
                           "model's source.") from None


def check_hf_weights(hf_dir: str | Path, cfg: ModelConfig, files: list[Path] | None = None) -> None:
    """Every safetensors file of `hf_dir` readable, and every tensor's shape the one config.json implies."""
    d = Path(hf_dir)
    files = files if files is not None else sorted(d.glob("*.safetensors"))
    stored = _stored_shapes(files)
    wrong = [f"{k}: {shape} in {f.name}, config.json implies {expected[k]}"
             for expected in (expected_hf_shapes(cfg),)
             for k, (shape, f) in sorted(stored.items()) if k in expected and shape != expected[k]]
    if wrong:
        raise HFModelError(f"{d / 'config.json'} disagrees with the weights beside it (does it belong to another "
                           "model?):\n  " + "\n  ".join(wrong[:8]) + (" …" if len(wrong) > 8 else ""))
