"""Qwen3 (dense, per-head q/k RMSNorm) through `scaletrain convert` both ways and checkpoint.init_from_hf, proven
against transformers on models built here with odd shapes (GQA, head_dim ≠ hidden/heads, tied and untied)."""

from __future__ import annotations

import json

import pytest
import torch

from scaletrain.checkpoint.hf import load_full_model
from scaletrain.cli import main
from scaletrain.models.llama.hf import UnsupportedModelError, config_from_hf

from dist_harness import run_ranks
from hf_helpers import assert_round_trip, assert_same_logits_and_greedy, hf_first_batch_loss, patch_hf_float64
from layout_models import tp_train
from parity import assert_matches, rel

pytestmark = pytest.mark.parity

transformers = pytest.importorskip("transformers")

VOCAB = 97
# Odd sizes: hidden 40 with 6 heads of 12 (head_dim is Qwen3's own, not 40 // 6), 2 kv heads (GQA).
SHAPE = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=52, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, head_dim=12, max_position_embeddings=96, rms_norm_eps=1e-6)


def _qwen3(tmp_path, tied: bool, **extra):
    """A random transformers Qwen3 saved to a directory; norms randomised so their map is really tested."""
    cfg = transformers.Qwen3Config(**SHAPE, tie_word_embeddings=tied, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6}, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    out = tmp_path / f"qwen3-{tied}"
    model.save_pretrained(out)
    return out, model


def _convert(*args: str) -> None:
    assert main(["convert", *args]) == 0


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_round_trip_is_bit_exact_and_keeps_every_config_field(tmp_path, tied):
    hf_dir, hf = _qwen3(tmp_path, tied)
    assert_round_trip(tmp_path, hf_dir, hf, "q_norm")
    assert type(transformers.AutoConfig.from_pretrained(str(tmp_path / "export"))).__name__ == "Qwen3Config"


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_float64_logits_match_transformers(tmp_path, monkeypatch, tied):
    hf_dir, hf = _qwen3(tmp_path, tied)
    hf = hf.double()
    hf.config._attn_implementation = "eager"
    _convert("from-hf", str(hf_dir), str(tmp_path / "ckpt"), "--dtype", "float64")
    cfg, ours = load_full_model(tmp_path / "ckpt", torch.float64)
    assert cfg.qk_norm and cfg.head_dim == 12 and cfg.hf_architecture == "Qwen3ForCausalLM"
    patch_hf_float64(monkeypatch, hf, ours)
    assert_same_logits_and_greedy(ours, hf, VOCAB, (3, 23), 12)


def test_qwen3_export_without_a_source_config(tmp_path):
    """A run trained from scratch (no HF source recorded): the mapping alone writes a config transformers loads
    as Qwen3 with the same architecture (q/k norms included: no missing or unexpected keys)."""
    hf_dir, hf = _qwen3(tmp_path, False)
    _convert("from-hf", str(hf_dir), str(tmp_path / "ckpt"))
    state_file = tmp_path / "ckpt" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.pop("hf_config"), state.pop("hf_generation_config")
    state_file.write_text(json.dumps(state))
    _convert("to-hf", str(tmp_path / "ckpt"), str(tmp_path / "export"))
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"),
                                                                       output_loading_info=True)
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, hf(ids).logits)


def test_qwen3_options_it_cannot_run_are_refused():
    base = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 8}
    assert config_from_hf(base).qk_norm
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        config_from_hf({**base, "use_sliding_window": True, "sliding_window": 64})
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        config_from_hf({**base, "layer_types": ["full_attention", "sliding_attention"]})


@pytest.mark.parametrize("sp", [False, True])
def test_qwen3_tp2_matches_single_process_float64(sp):
    """q/k norms under tp: each rank normalises its own heads, so their weight gradients are summed over tp —
    with and without sequence parallelism (without the sum the step-1 gradients of q_norm/k_norm differ)."""
    from scaletrain.config.schema import ModelConfig
    from scaletrain.config.validate import resolve_model

    cfg = resolve_model(ModelConfig(vocab_size=128, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                                    head_dim=10, ffn_hidden_size=72, qk_norm=True, hf_architecture="Qwen3ForCausalLM"),
                        tokenizer_vocab=None, tp=1, seq_length=16)
    ref = tp_train(0, 1, cfg, False, torch.float64)
    ranks = run_ranks(2, tp_train, cfg, sp, torch.float64)
    assert rel(torch.cat([r["logits"] for r in ranks], dim=-1), ref["logits"]) < 1e-10
    assert_matches(ranks, ref, 2, 1e-10)


def test_train_from_qwen3_weights(tmp_path, tokenizer_dir, dataset_prefix):
    """checkpoint.init_from_hf with a Qwen3 directory: the first step's loss is transformers' loss on that batch."""
    from scaletrain.checkpoint.hf import checkpoint_model_config

    from conftest import TINY, read_metrics, tiny_overrides

    cfg = transformers.Qwen3Config(**{**SHAPE, "vocab_size": 512}, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    args = ["train", "--config", TINY]
    for item in tiny_overrides(tmp_path / "run", tokenizer_dir, dataset_prefix, **{
            "checkpoint.init_from_hf": str(tmp_path / "hf"), "train.steps": 1, "optim.warmup_steps": 0}):
        args += ["--set", item]
    assert main(args) == 0
    got = checkpoint_model_config(tmp_path / "run" / "checkpoints" / "step_0000001")
    assert (got.qk_norm, got.head_dim, got.hidden_size) == (True, 12, 40)
    ref = hf_first_batch_loss(hf, dataset_prefix)
    assert abs(read_metrics(tmp_path / "run")[0]["loss"] - ref) <= 1e-5 * ref


def test_qwen3_reward_model_imports_and_exports(tmp_path):
    """Qwen3ForSequenceClassification (a reward model's body and `score` head) both ways: scores at the last
    position equal transformers' pooled scores; the export is the same class with bit-identical tensors."""
    cfg = transformers.Qwen3Config(**SHAPE, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.Qwen3ForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "rm")
    _convert("from-hf", str(tmp_path / "rm"), str(tmp_path / "ckpt"))
    got, ours = load_full_model(tmp_path / "ckpt")
    assert got.num_labels == 1 and got.qk_norm
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))  # no pad id: last token
    with torch.no_grad():
        assert (ours(ids)[:, -1] - hf(ids).logits).abs().max().item() <= 1e-5
    _convert("to-hf", str(tmp_path / "ckpt"), str(tmp_path / "export"))
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "export")).eval()
    assert type(back).__name__ == "Qwen3ForSequenceClassification"
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
