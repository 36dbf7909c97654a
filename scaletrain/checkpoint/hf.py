"""Hugging Face import/export driver: scaletrain checkpoints (any layout) ↔ HF model directories.

The family's `hf.py` owns the key map; this module moves files. Export loads a checkpoint saved at
any parallel layout into one full model (DCP reshards on load), converts, and writes config.json,
generation_config.json, sharded safetensors with an index for large models, and the tokenizer the
run trained with. Import reads config.json + safetensors (no pickle), converts, and writes a
model-only scaletrain checkpoint that every layout can load. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scaletrain.checkpoint.files import CheckpointError, read_trainer_state
from scaletrain.checkpoint.hf_checks import check_hf_weights, read_hf_config
from scaletrain.checkpoint.hf_config import (
    TokenIds,
    export_config,
    export_generation_config,
    read_source,
)
from scaletrain.checkpoint.load import load_checkpoint
from scaletrain.checkpoint.save import write_checkpoint_dir
from scaletrain.config.schema import ModelConfig
from scaletrain.distributed.dims import ParallelDims
from scaletrain.models import build_model
from scaletrain.models.llama.hf import from_hf_state_dict
from scaletrain.nn.init import init_parameters, local_part, logical, spec_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def checkpoint_model_config(path: str | Path) -> ModelConfig:
    state = read_trainer_state(path)
    if "model_config" not in state:
        raise CheckpointError(f"{path} records no model config; it was written by an older scaletrain.")
    return ModelConfig(**state["model_config"])


def load_full_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, torch.nn.Module]:
    """One full model on CPU from a checkpoint saved at any layout."""
    cfg = checkpoint_model_config(path)
    model = build_model(cfg, dtype=dtype)
    load_checkpoint(path, model, None, dims=ParallelDims.single())
    return cfg, model


def write_hf_dir(out: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], *, dtype: str,
                 ids: TokenIds, max_shard_bytes: int = 5 * 2**30,
                 source: tuple[dict | None, dict | None] = (None, None)) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(export_config(cfg, ids, dtype, source[0]), indent=2))
    (out / "generation_config.json").write_text(json.dumps(export_generation_config(ids, source[1]), indent=2))


def read_hf_dir(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, our full state dict) of a local HF model directory (safetensors only)."""
    d = Path(hf_dir)
    cfg = read_hf_config(d)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d} has no .safetensors weights (pickled .bin weights are not loaded: "
                                "convert them with transformers' save_pretrained(safe_serialization=True)).")
    check_hf_weights(d, cfg, files)  # headers only: readable files, shapes that agree with config.json
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    return cfg, from_hf_state_dict(hf, cfg)


def import_from_hf(hf_dir: str | Path, out_checkpoint: str | Path, dtype: str = "float32") -> Path:
    """`scaletrain convert from-hf`: HF directory → model-only scaletrain checkpoint (any layout loads it)."""
    cfg, sd = read_hf_dir(hf_dir)
    model = build_model(cfg, dtype=DTYPES[dtype])
    init_parameters(model, 0)  # every tensor is overwritten just below; strict load checks that
    model.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in sd.items()}, strict=True)
    out = Path(out_checkpoint)
    source, generation = read_source(Path(hf_dir))  # what the export gives back (checkpoint/hf_config.py)
    state = {"step": 0, "consumed_samples": 0, "model_config": dataclasses.asdict(cfg), "source": str(hf_dir),
             "hf_config": source, "hf_generation_config": generation}
    write_checkpoint_dir(out, model, None, state, tokenizer=hf_dir)
    return out


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, tp_rank: int = 0, tp_size: int = 1) -> list[str]:
    """Copy HF weights into a (possibly tp-sharded, pipeline-pruned) built model: each rank takes its slice.

    A reward model (num_labels > 0) may start from a causal LM: its body is copied and the `score`
    head keeps its fresh initialisation (the LM head is not used). Returns the parameters left at
    their initialisation."""
    _cfg, sd = read_hf_dir(hf_dir)
    fresh = []
    for name, p in model.named_parameters():
        if name == "score.weight" and name not in sd:
            fresh.append(name)
            continue
        full = sd[name]
        spec = spec_of(p)
        logical(p, spec).copy_(local_part(full, spec, tp_rank, tp_size).to(p.dtype))
    return fresh
