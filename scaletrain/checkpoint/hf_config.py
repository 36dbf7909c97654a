"""What an export's config.json and generation_config.json say: every field a loader needs.

config.json = the family's mapping of the model config (`config_to_hf`: shapes, RoPE, biases, head_dim,
dtype) + the token ids the tokenizer gives (bos, eos, pad, unk) + the fields of the HF model the run
started from that scaletrain does not model (inert or inference-neutral ones: `pretraining_tp`,
`use_cache`, `attention_dropout`, Qwen2's `max_window_layers` / `sliding_window` when unused, …), so an
import → export gives back the source config. Where the tokenizer names no id, the source's stays.

generation_config.json = the source's (sampling defaults such as temperature), with bos and pad from the
tokenizer and the eos list: the tokenizer's eos, the source's eos ids, and the end-of-turn marker of the
chat template the export carries where that is one token of its own (Llama 3's <|eot_id|>), so
`generate()` stops at the end of a turn. A ChatML model whose eos is <|im_end|> keeps the single id.

The source is the HF directory: recorded in the checkpoint by `convert from-hf` (trainer_state
`hf_config`, `hf_generation_config`), or the run's checkpoint.init_from_hf directory (its config.toml).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaletrain.config.load import load_config
from scaletrain.config.schema import ModelConfig
from scaletrain.models.llama.hf import config_to_hf

# Never carried from the source: set by the export itself (or meaningless in another directory).
_OWN = {"architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
        "quantization_config", "auto_map", "_commit_hash", "_from_model_config", "rope_scaling", "rope_theta"}
# Written by the mapping at transformers' defaults because scaletrain does not model them: the source wins.
_SOFT = {"use_cache", "attention_dropout", "pretraining_tp", "sliding_window"}
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


@dataclass(frozen=True)
class TokenIds:
    """The special ids an export records (None: the tokenizer has none); end_of_turn: the one-token
    end-of-turn marker of the chat template the export carries, if any and not eos."""

    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    unk: int | None = None
    end_of_turn: int | None = None


def _ids(value: Any) -> list[int]:
    return [] if value is None else [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _merge_id(ours: int | None, source: Any) -> Any:
    """Ours (the tokenizer's), unless it is absent or already in the source's list, which is then kept."""
    if ours is None or ours in _ids(source):
        return source
    return ours


def export_config(cfg: ModelConfig, ids: TokenIds, dtype: str, source: dict[str, Any] | None) -> dict[str, Any]:
    out = config_to_hf(cfg, bos_id=ids.bos, eos_id=ids.eos, dtype=dtype, pad_id=ids.pad, unk_id=ids.unk)
    if not source:
        return out
    for key, value in source.items():
        if key in _OWN:
            continue
        if key in ID_KEYS:
            out[key] = _merge_id(out.get(key), value)
        elif key not in out or key in _SOFT:
            out[key] = value
    return out


def export_generation_config(ids: TokenIds, source: dict[str, Any] | None) -> dict[str, Any]:
    out = {k: v for k, v in (source or {}).items() if k not in _OWN}
    if ids.bos is not None:
        out["bos_token_id"] = ids.bos
    eos = _ids(out.get("eos_token_id"))
    for extra in (ids.eos, ids.end_of_turn):
        if extra is not None and extra not in eos:
            eos.append(extra)
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if ids.pad is not None:
        out["pad_token_id"] = ids.pad
    if not source:
        out["do_sample"] = False
    return out


def source_configs(ckpt: Path, state: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(config.json, generation_config.json) of the HF model a checkpoint started from, where known."""
    if "hf_config" in state:
        return state["hf_config"], state.get("hf_generation_config")
    run_config = ckpt.parent.parent / "config.toml"
    if not run_config.is_file():
        return None, None
    hf_dir = load_config(run_config).checkpoint.init_from_hf
    return read_source(Path(hf_dir)) if hf_dir else (None, None)


def read_source(hf_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A local HF directory's config.json and generation_config.json (None where absent)."""
    out: list[dict[str, Any] | None] = []
    for name in ("config.json", "generation_config.json"):
        f = hf_dir / name
        out.append(json.loads(f.read_text()) if f.is_file() else None)
    return out[0], out[1]
