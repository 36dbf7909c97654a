"""A run's checkpoint → a Hugging Face directory (`scaletrain convert to-hf`, checkpoint.export_hf): the
weights through the family's key map (checkpoint/hf.py writes the files), the tokenizer the run trained with
and — for a chat run — the chat template it trained with as the export's only template, so transformers'
apply_chat_template renders prompts as the model was trained. Run-level: it reads the run's config.toml
next to checkpoints/ and asks the run's stage whether it trained on chat rows."""

from __future__ import annotations

from pathlib import Path

import jinja2
import torch
from safetensors import safe_open

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.chat.templates import find_templates, write_single_template
from scaletrain.chat.tools import bundled_tools
from scaletrain.checkpoint.atomic_dir import replaces_directory
from scaletrain.checkpoint.files import CheckpointError, copy_tokenizer, read_trainer_state
from scaletrain.checkpoint.hf import DTYPES, load_full_model, write_hf_dir
from scaletrain.checkpoint.hf_config import TokenIds, source_configs
from scaletrain.checkpoint.select import latest_checkpoint
from scaletrain.config.load import load_config
from scaletrain.data.tokenizer import load_tokenizer
from scaletrain.models.llama.hf import to_hf_state_dict
from scaletrain.stages.registry import get_stage


@replaces_directory("out_dir", marker="config.json")  # an earlier export is replaced as a whole, atomically
def export_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32",
                 max_shard_bytes: int = 5 * 2**30) -> Path:
    """`scaletrain convert to-hf`: checkpoint (any layout) → HF directory loadable by transformers."""
    ckpt, out = Path(checkpoint), Path(out_dir)
    if not (ckpt / "trainer_state.json").is_file() and ckpt.is_dir():
        # A run's checkpoints/ folder: its latest, or — `latest` missing — the newest complete one (warned).
        ckpt = latest_checkpoint(ckpt, warn=True) or ckpt
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    cfg, model = load_full_model(ckpt, _stored_dtype(ckpt))
    tensors = to_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    ids = TokenIds()
    if copy_tokenizer(ckpt / "tokenizer", out):
        ids = token_ids(load_tokenizer(out), write_chat_template(ckpt, out))
    write_hf_dir(out, cfg, tensors, dtype=dtype, ids=ids, max_shard_bytes=max_shard_bytes,
                 source=source_configs(ckpt, read_trainer_state(ckpt)))
    return out


def token_ids(tok, renderer) -> TokenIds:
    """The tokenizer's special ids, and the end-of-turn marker of the chat template the export carries (the
    run's `renderer`, else the tokenizer's own) where it is one token other than eos: generation stops there too."""
    end = None
    if renderer is not None or find_templates(Path(tok.path).parent) is not None:
        try:
            marker = (renderer or ChatRenderer(tok, "auto")).end_of_turn()
        except (ValueError, TypeError, jinja2.TemplateError):  # a template that cannot render the probe
            marker = None
        marker_ids = tok.encode(marker) if marker else []
        end = marker_ids[0] if len(marker_ids) == 1 and marker_ids[0] != tok.eos_id else None
    return TokenIds(tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, end)


def write_chat_template(ckpt: Path, out: Path):
    """A fine-tuned run's chat template — the one it trained with, chosen from the run's config.toml next to
    checkpoints/ exactly as the run chose it — as the export's only template (chat/templates.py
    `write_single_template`), so transformers' apply_chat_template renders prompts as the model was trained.
    Returns the run's ChatRenderer (`origin` says where the template came from); None for a checkpoint that is
    not a chat run's, whose tokenizer files are kept as they are."""
    run_config = ckpt.parent.parent / "config.toml"
    if not run_config.is_file():
        return None
    run = load_config(run_config)
    if get_stage(run.posttrain.objective).reads_documents(run):  # trained on documents: no chat format to record
        return None
    pt = run.posttrain
    renderer = ChatRenderer(load_tokenizer(out), pt.chat.template, tools=bundled_tools(pt.chat.tools))
    write_single_template(out, renderer.source)
    return renderer


def _stored_dtype(path: Path) -> torch.dtype:
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
