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
import shutil
from pathlib import Path

import torch

from scaletrain.checkpoint.hf_checks import check_hf_weights, read_hf_config
from scaletrain.checkpoint.io import (
    CheckpointError,
    load_checkpoint,
    read_trainer_state,
    write_checkpoint_dir,
)
from scaletrain.config.schema import ModelConfig
from scaletrain.models.llama.hf import config_to_hf, from_hf_state_dict, to_hf_state_dict

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def copy_tokenizer(src: str | Path, dst: Path) -> bool:
    """Copy the tokenizer files of `src` (a folder or a tokenizer file inside one) into `dst`."""
    folder = Path(src)
    folder = folder if folder.is_dir() else folder.parent
    found = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not found:
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for f in found:
        shutil.copy2(f, dst / f.name)
    return True


def checkpoint_model_config(path: str | Path) -> ModelConfig:
    state = read_trainer_state(path)
    if "model_config" not in state:
        raise CheckpointError(f"{path} records no model config; it was written by an older scaletrain.")
    return ModelConfig(**state["model_config"])


def load_full_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, torch.nn.Module]:
    """One full model on CPU from a checkpoint saved at any layout."""
    from scaletrain.models import build_model

    cfg = checkpoint_model_config(path)
    model = build_model(cfg, dtype=dtype)
    load_checkpoint(path, model, None)
    return cfg, model


def _stored_dtype(path: Path) -> torch.dtype:
    from safetensors import safe_open

    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; give a step_* directory or a run's "
                                "checkpoints/ folder.")
    f = next(path.glob("*.safetensors"), None)
    if f is None:
        read_trainer_state(path)  # names a directory that is no checkpoint
        raise CheckpointError(f"{path} holds no .safetensors files; the checkpoint is incomplete or corrupt.")
    with safe_open(str(f), framework="pt") as fh:
        key = next(k for k in fh.keys() if k.startswith("model."))
        return torch.float64 if fh.get_slice(key).get_dtype() == "F64" else torch.float32


def write_hf_dir(out: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], *, dtype: str,
                 bos_id: int | None, eos_id: int | None, max_shard_bytes: int = 5 * 2**30,
                 pad_id: int | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(_DTYPES[dtype]).contiguous() for k, v in tensors.items()}
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
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, bos_id=bos_id, eos_id=eos_id, dtype=dtype,
                                                             pad_id=pad_id), indent=2))
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def export_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32",
                 max_shard_bytes: int = 5 * 2**30) -> Path:
    """`scaletrain convert to-hf`: checkpoint (any layout) → HF directory loadable by transformers."""
    from scaletrain.data.tokenizer import load_tokenizer

    ckpt, out = Path(checkpoint), Path(out_dir)
    if (ckpt / "latest").is_file():  # a run's checkpoints/ folder: take its latest
        ckpt = ckpt / (ckpt / "latest").read_text().strip()
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    cfg, model = load_full_model(ckpt, _stored_dtype(ckpt))
    tensors = to_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    bos = eos = pad = None
    if copy_tokenizer(ckpt / "tokenizer", out):
        tok = load_tokenizer(out)
        bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
        write_chat_template(ckpt, out)
    write_hf_dir(out, cfg, tensors, dtype=dtype, bos_id=bos, eos_id=eos, max_shard_bytes=max_shard_bytes, pad_id=pad)
    return out


def write_chat_template(ckpt: Path, out: Path) -> None:
    """A fine-tuned run's chat template into the export's tokenizer_config.json (where the tokenizer
    had none, or the run chose another), so transformers' apply_chat_template renders prompts as the
    model was trained. Read from the run's config.toml next to checkpoints/."""
    from scaletrain.config.load import load_config
    from scaletrain.config.validate import uses_pretraining_data
    from scaletrain.posttrain.chat import BUNDLED, CHATML

    run_config, tok_config = ckpt.parent.parent / "config.toml", out / "tokenizer_config.json"
    if not run_config.is_file() or not tok_config.is_file():
        return
    run = load_config(run_config)
    pt = run.posttrain
    if uses_pretraining_data(run):  # trained on documents: no chat format to record
        return
    current = json.loads(tok_config.read_text())
    if pt.chat_template == "auto":
        if isinstance(current.get("chat_template"), str):
            return  # trained with the tokenizer's own template, already there
        source = CHATML
    else:
        source = BUNDLED.get(pt.chat_template, pt.chat_template)
    current["chat_template"] = source
    tok_config.write_text(json.dumps(current, indent=2, ensure_ascii=False))


def read_hf_dir(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, our full state dict) of a local HF model directory (safetensors only)."""
    from safetensors.torch import load_file

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
    from scaletrain.models import build_model
    from scaletrain.nn.init import init_parameters

    cfg, sd = read_hf_dir(hf_dir)
    model = build_model(cfg, dtype=_DTYPES[dtype])
    init_parameters(model, 0)  # every tensor is overwritten just below; strict load checks that
    model.load_state_dict({k: v.to(_DTYPES[dtype]) for k, v in sd.items()}, strict=True)
    out = Path(out_checkpoint)
    state = {"step": 0, "consumed_samples": 0, "model_config": dataclasses.asdict(cfg), "source": str(hf_dir)}
    write_checkpoint_dir(out, model, None, state, tokenizer=hf_dir)
    return out


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, tp_rank: int = 0, tp_size: int = 1) -> list[str]:
    """Copy HF weights into a (possibly tp-sharded, pipeline-pruned) built model: each rank takes its slice.

    A reward model (num_labels > 0) may start from a causal LM: its body is copied and the `score`
    head keeps its fresh initialisation (the LM head is not used). Returns the parameters left at
    their initialisation."""
    from scaletrain.nn.init import logical, spec_of

    _cfg, sd = read_hf_dir(hf_dir)
    fresh = []
    for name, p in model.named_parameters():
        if name == "score.weight" and name not in sd:
            fresh.append(name)
            continue
        full = sd[name]
        spec = spec_of(p)
        if spec.shard_dim is not None and tp_size > 1:
            full = full.chunk(tp_size, dim=spec.shard_dim)[tp_rank]
        logical(p, spec).copy_(full.to(p.dtype))
    return fresh
