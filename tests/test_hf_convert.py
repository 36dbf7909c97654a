"""Hugging Face conversion both ways, proven against transformers on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from scaletrain.checkpoint.hf import import_from_hf, load_full_model
from scaletrain.export import export_to_hf
from scaletrain.models.llama.hf import UnsupportedModelError, config_from_hf

from dist_harness import run_ranks
from hf_helpers import assert_same_logits_and_greedy, hf_first_batch_loss, patch_hf_float64, resave_in_layout

pytestmark = pytest.mark.parity

transformers = pytest.importorskip("transformers")


def _hf_model(tmp_path, arch: str, tied: bool, kv: int, vocab: int = 96):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=kv, max_position_embeddings=128, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                       use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.MistralConfig(**common, sliding_window=None)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms start at one and biases at zero: randomise so the map is really tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / f"hf-{arch}-{tied}-{kv}"
    model.save_pretrained(out, safe_serialization=True)
    return out, model


CASES = [("llama", False, 2), ("llama", True, 4), ("qwen2", True, 2), ("mistral", False, 1)]


@pytest.mark.parametrize("arch,tied,kv", CASES)
def test_import_matches_transformers_and_round_trips(tmp_path, arch, tied, kv):
    hf_dir, hf = _hf_model(tmp_path, arch, tied, kv)
    ckpt = import_from_hf(hf_dir, tmp_path / "ckpt")
    _cfg, ours = load_full_model(ckpt)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    out = export_to_hf(ckpt, tmp_path / "export")
    from safetensors.torch import load_file

    original = load_file(str(hf_dir / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    original = {k: v for k, v in original.items() if not (tied and k == "lm_head.weight")}
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)  # bit-identical
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == hf.config.rope_parameters["rope_theta"] and "rope_parameters" in config
    reloaded, info = type(hf).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("arch,tied,kv", CASES[:3])
def test_float64_logits_parity(tmp_path, monkeypatch, arch, tied, kv):
    hf_dir, hf = _hf_model(tmp_path, arch, tied, kv)
    hf = hf.double()
    hf.config._attn_implementation = "eager"
    ckpt = import_from_hf(hf_dir, tmp_path / "ckpt", dtype="float64")
    _cfg, ours = load_full_model(ckpt, torch.float64)
    patch_hf_float64(monkeypatch, hf, ours)
    # Greedy decoding: 20 identical tokens (float64, where a random tiny model's near-ties cannot flip
    # the argmax between HF's cached decoding and ours).
    assert_same_logits_and_greedy(ours, hf, 96, (2, 24), 20)


@pytest.mark.parametrize("tied", [False, True])
def test_import_at_tp2_pp2_and_export_from_the_sharded_checkpoint(tmp_path, tied):
    hf_dir, hf = _hf_model(tmp_path, "llama", tied, 2)
    ckpt = import_from_hf(hf_dir, tmp_path / "ckpt")
    counts = run_ranks(4, resave_in_layout, str(ckpt), str(tmp_path / "sharded"), 2, 2, timeout=120)
    assert all(c > 0 for c in counts)
    sharded = tmp_path / "sharded" / "step_0000001"
    assert len(list(sharded.glob("*.safetensors"))) == 4  # one file per rank
    out = export_to_hf(sharded, tmp_path / "export")
    from safetensors.torch import load_file

    original = load_file(str(hf_dir / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    original = {k: v for k, v in original.items() if not (tied and k == "lm_head.weight")}
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    ids = torch.randint(0, 96, (2, 16))
    reloaded = type(hf).from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
        assert (load_full_model(sharded)[1](ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_unsupported_options_are_refused():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    config_from_hf(base)
    with pytest.raises(UnsupportedModelError, match="architecture 'GPT2LMHeadModel'"):
        config_from_hf({**base, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="hidden_act = 'gelu'"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        config_from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        config_from_hf({**base, "attention_bias": True})


def test_sharded_bf16_export_with_index(tmp_path):
    hf_dir, hf = _hf_model(tmp_path, "llama", False, 2)
    ckpt = import_from_hf(hf_dir, tmp_path / "ckpt")
    out = export_to_hf(ckpt, tmp_path / "export", dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded, info = type(hf).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(reloaded.model.embed_tokens.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))


def test_train_from_hf_weights(tmp_path, tokenizer_dir, dataset_prefix):
    """--set checkpoint.init_from_hf: the HF config replaces [model] and training starts from its weights."""
    from scaletrain.checkpoint.hf import checkpoint_model_config
    from scaletrain.cli import main

    from conftest import TINY, read_metrics, tiny_overrides

    hf_dir, hf = _hf_model(tmp_path, "llama", True, 2, vocab=512)
    args = ["train", "--config", TINY]
    for item in tiny_overrides(tmp_path / "run", tokenizer_dir, dataset_prefix, **{
            "checkpoint.init_from_hf": str(hf_dir), "train.steps": 2}):
        args += ["--set", item]
    assert main(args) == 0
    cfg = checkpoint_model_config(tmp_path / "run" / "checkpoints" / "step_0000002")
    assert (cfg.hidden_size, cfg.num_layers, cfg.tie_embeddings, cfg.rope_scaling) == (32, 4, True, "llama3")
    # The first step's loss is the HF model's loss on that batch: the weights really came from HF.

    ref = hf_first_batch_loss(hf, dataset_prefix)
    assert abs(read_metrics(tmp_path / "run")[0]["loss"] - ref) <= 1e-5 * ref
