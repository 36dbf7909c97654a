"""The Llama model: architecture checked against transformers, layout-independent init, GQA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.models import build_model
from scaletrain.models.llama.hf import to_hf_state_dict
from scaletrain.nn import init_parameters, spec_of

from hf_helpers import run_rotary_in_float64

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                rope_theta=10000.0)
    base.update(kw)
    return resolve_model(ModelConfig(**base), tokenizer_vocab=None, tp=1, seq_length=64)


def _hf_model(cfg: ModelConfig, family: str):
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling_factor,
                "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_position}
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
              tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_position_embeddings)
    if family == "qwen2":
        hf_cfg = transformers.Qwen2Config(**kw)
        cls = transformers.Qwen2ForCausalLM
    else:
        hf_cfg = transformers.LlamaConfig(**kw)
        cls = transformers.LlamaForCausalLM
    hf_cfg._attn_implementation = "eager"
    return cls(hf_cfg).to(torch.float64).eval()


@pytest.mark.parametrize("family,kw", [
    ("llama", {}),
    ("llama", {"tie_embeddings": True, "num_kv_heads": 4}),
    ("llama", {"rope_scaling": "llama3", "rope_theta": 500000.0, "rope_original_max_position": 16,
               "rope_scaling_factor": 4.0}),
    ("qwen2", {"qkv_bias": True, "num_kv_heads": 1}),
])
def test_logits_match_transformers_float64(family, kw):
    cfg = _cfg(**kw)
    model = build_model(cfg, dtype=torch.float64)
    init_parameters(model, seed=7)
    if cfg.qkv_bias:  # biases initialise to zero; make them matter
        with torch.no_grad():
            for layer in model.layers.values():
                layer.attn.qkv.bias.normal_(0, 0.1)
    hf = _hf_model(cfg, family)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not [k for k in missing if "rotary" not in k and not (cfg.tie_embeddings and k == "lm_head.weight")]
    assert not unexpected
    hf.tie_weights()
    run_rotary_in_float64(hf, model)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = model(ids)
    ref = hf(ids).logits
    # transformers' RMSNorm and eager softmax also upcast to float32 only (not float64), so agreement
    # is at float32 rounding (~1e-8 here); a wrong layout, rope or norm misses by orders more.
    assert (ours - ref).abs().max().item() < 1e-6


def test_init_is_layout_independent_and_order_independent():
    cfg = _cfg()
    full = build_model(cfg, dtype=torch.float64)
    init_parameters(full, seed=3)
    tp = 2
    shards = []
    for rank in range(tp):
        m = build_model(cfg, tp_size=tp, dtype=torch.float64)
        init_parameters(m, seed=3, tp_rank=rank, tp_size=tp)
        shards.append(dict(m.named_parameters()))
    for name, p in full.named_parameters():
        spec = spec_of(p)
        if spec.shard_dim is None:
            assert all(torch.equal(s[name], p) for s in shards), name
        else:
            assert torch.equal(torch.cat([s[name] for s in shards], dim=spec.shard_dim), p), name
    other = build_model(dataclasses.replace(cfg), dtype=torch.float64)
    init_parameters(other, seed=4)
    assert not torch.equal(other.embed.weight, full.embed.weight)


def test_param_specs_and_causality():
    cfg = _cfg()
    model = build_model(cfg, dtype=torch.float64)
    init_parameters(model, seed=1)
    assert spec_of(model.layers["0"].attn_norm.weight).init == "ones"
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % cfg.vocab_size
    a, b = model(ids), model(changed)
    assert torch.equal(a[0, :10], b[0, :10])  # no position sees the future
    assert not torch.equal(a[0, 10:], b[0, 10:])
