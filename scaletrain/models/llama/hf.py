"""Hugging Face interop for the Llama family: config mapping and the explicit key map (DESIGN rule 8).

Architectures: LlamaForCausalLM (incl. Llama 3.1 rope scaling), Qwen2ForCausalLM (qkv bias),
Qwen3ForCausalLM (per-head q/k RMSNorm, head_dim of its own), MistralForCausalLM (without sliding-window
attention), the mixtures of experts Qwen3MoeForCausalLM and MixtralForCausalLM (their MoE fields and expert
tensors: models/llama/hf_moe.py), and the *ForSequenceClassification forms
(reward models: a `score` head instead of `lm_head`, model.num_labels > 0). Anything else, or an
option this model does not implement, is refused with a message — never a silent partial conversion.

Layout differences handled here:
  - q/k/v: HF keeps three matrices; we keep one fused qkv weight grouped per key/value head
    ([kv_heads, q_per_kv + 2, head_dim, hidden] flattened), so a tp slice holds whole groups.
  - gate/up: HF keeps two matrices; we stack them as [2, ffn, hidden].
  - RoPE: both use the rotate-half layout, so q/k rows need no permutation.
  - Qwen3's q_norm/k_norm: one [head_dim] weight each, the same in both (applied per head before RoPE).
"""

from __future__ import annotations

from typing import Any

import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.models.llama.hf_moe import (
    MIXTRAL,
    MOE_ARCHITECTURES,
    QWEN3_MOE,
    MoEConversionError,
    is_hf_moe_layer,
    moe_block_from_hf,
    moe_block_to_hf,
    moe_from_hf,
    moe_to_hf,
)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
                 "Qwen3ForCausalLM": "qwen3", **MOE_ARCHITECTURES}  # → the model_type transformers writes
CLASSIFIERS = {"LlamaForSequenceClassification": "LlamaForCausalLM", "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
               "MistralForSequenceClassification": "MistralForCausalLM",
               "Qwen3ForSequenceClassification": "Qwen3ForCausalLM"}  # → the causal LM of the same body
QK_NORM = {"Qwen3ForCausalLM", QWEN3_MOE}  # architectures with per-head q/k RMSNorm


def causal_architecture(arch: str) -> str:
    return CLASSIFIERS.get(arch, arch)


def classifier_architecture(arch: str) -> str:
    return next((k for k, v in CLASSIFIERS.items() if v == arch), arch)


class UnsupportedModelError(ValueError):
    """An HF model this converter cannot reproduce exactly; the message names the option."""


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from a config.json of transformers 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = {**legacy, **params}
    return {"theta": float(theta), "type": kind, "scaling": scaling}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig of an HF config.json dict; raises UnsupportedModelError for what we cannot run."""
    archs = hf.get("architectures") or []
    arch = causal_architecture(archs[0]) if archs else None
    num_labels = 0
    if archs and archs[0] in CLASSIFIERS:
        num_labels = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)  # transformers' default is 2
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {arch!r} is not supported; supported: "
                                    f"{', '.join([*ARCHITECTURES, *CLASSIFIERS])}.")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act = {hf['hidden_act']!r}: only SwiGLU with silu is implemented.")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias = true is not implemented.")
    if arch in ("LlamaForCausalLM", *QK_NORM) and hf.get("attention_bias"):
        raise UnsupportedModelError("attention_bias = true (bias on o_proj too) is not implemented; only Qwen2's "
                                    "q/k/v bias is.")
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        raise UnsupportedModelError(f"layer_types = {hf['layer_types']}: only full causal attention is implemented.")
    sliding = hf.get("sliding_window")
    if sliding is not None and (arch in ("MistralForCausalLM", MIXTRAL) or hf.get("use_sliding_window")):
        raise UnsupportedModelError(f"sliding-window attention (sliding_window = {sliding}) is not implemented; "
                                    "only full causal attention is.")
    rope = _rope(hf)
    kw: dict[str, Any] = {}
    if rope["type"] == "llama3":
        s = rope["scaling"]
        kw = {"rope_scaling": "llama3", "rope_scaling_factor": float(s["factor"]),
              "rope_low_freq_factor": float(s["low_freq_factor"]),
              "rope_high_freq_factor": float(s["high_freq_factor"]),
              "rope_original_max_position": int(s["original_max_position_embeddings"])}
    elif rope["type"] != "default":
        raise UnsupportedModelError(f"rope type {rope['type']!r} is not implemented (default and llama3 are).")
    if arch in MOE_ARCHITECTURES:
        try:
            moe, ffn = moe_from_hf(arch, hf)
        except MoEConversionError as e:
            raise UnsupportedModelError(str(e)) from None
        kw.update(moe=moe)
    else:
        ffn = hf["intermediate_size"]
    heads = hf["num_attention_heads"]
    return ModelConfig(
        family="llama", hf_architecture=arch, vocab_size=hf["vocab_size"], vocab_multiple=1,
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_hidden_size=ffn, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope["theta"], max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=arch == "Qwen2ForCausalLM",
        qk_norm=arch in QK_NORM,
        num_labels=num_labels, init_std=float(hf.get("initializer_range", 0.02)), **kw,
    )


def config_to_hf(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None, dtype: str,
                 pad_id: int | None = None, unk_id: int | None = None) -> dict[str, Any]:
    """config.json for transformers: every field its Llama/Qwen2/Qwen3/Mistral config defines (those scaletrain does
    not model at transformers' defaults), top-level rope_theta (read by 4.x) and rope_parameters (5.x), and
    the tokenizer's special ids. A reward model (num_labels > 0) exports as *ForSequenceClassification,
    which scores the last token that is not `pad_token_id` (pad_id, else eos)."""
    arch = export_architecture(cfg)
    if cfg.qkv_bias and arch != "Qwen2ForCausalLM":
        raise UnsupportedModelError("a model with qkv bias exports as Qwen2ForCausalLM only.")
    if cfg.qk_norm != (arch in QK_NORM):
        raise UnsupportedModelError(f"qk_norm = {cfg.qk_norm} does not fit {arch}; q/k norms export as "
                                    f"{', '.join(sorted(QK_NORM))} only.")
    if (arch in MOE_ARCHITECTURES) != _has_experts(cfg):
        raise UnsupportedModelError(f"{arch} {'has' if arch in MOE_ARCHITECTURES else 'has no'} mixture-of-experts "
                                    "layers; model.moe.num_experts says otherwise (pick another hf_architecture).")
    model_type = ARCHITECTURES[arch]
    rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy_scaling = None
    if cfg.rope_scaling == "llama3":
        legacy_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                          "low_freq_factor": cfg.rope_low_freq_factor,
                          "high_freq_factor": cfg.rope_high_freq_factor,
                          "original_max_position_embeddings": cfg.rope_original_max_position}
        rope_params = {**legacy_scaling, "rope_theta": cfg.rope_theta}
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": legacy_scaling, "rope_parameters": rope_params,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "torch_dtype": dtype, "dtype": dtype,
        "use_cache": True,
    }
    if unk_id is not None:  # not a field of these configs; transformers keeps it (SmolLM2's config has it)
        out["unk_token_id"] = unk_id
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if arch == "Qwen2ForCausalLM":
        out.update(sliding_window=None, use_sliding_window=False)
        if cfg.head_dim == cfg.hidden_size // cfg.num_heads:  # Qwen2Config has no head_dim: only when it differs
            del out["head_dim"]
    if arch == "MistralForCausalLM":
        out.update(sliding_window=None)
    if arch in QK_NORM:
        out.update(attention_bias=False, sliding_window=None, use_sliding_window=False)
    if arch == MIXTRAL:
        out.update(sliding_window=None)
        if cfg.head_dim == cfg.hidden_size // cfg.num_heads:  # MixtralConfig's head_dim defaults to None
            del out["head_dim"]
    if arch in MOE_ARCHITECTURES:
        try:
            out.update(moe_to_hf(arch, cfg))
        except MoEConversionError as e:
            raise UnsupportedModelError(str(e)) from None
    if cfg.num_labels:
        out.update(architectures=[classifier_architecture(arch)], num_labels=cfg.num_labels,
                   id2label={str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
                   label2id={f"LABEL_{i}": i for i in range(cfg.num_labels)},
                   pad_token_id=pad_id if pad_id is not None else eos_id)
    return out


def _has_experts(cfg: ModelConfig) -> bool:
    return cfg.moe.num_experts > 0


def export_architecture(cfg: ModelConfig) -> str:
    """The HF causal-LM class a model exports as: model.hf_architecture, else the one its features imply."""
    if cfg.hf_architecture:
        return causal_architecture(cfg.hf_architecture)
    if _has_experts(cfg):
        return QWEN3_MOE if cfg.qk_norm else MIXTRAL
    return "Qwen2ForCausalLM" if cfg.qkv_bias else "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full (unsharded) state dict → HF names and layouts."""
    arch = export_architecture(cfg)
    qpk, d, h = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        w = sd[p + "attn.qkv.weight"].view(cfg.num_kv_heads, qpk + 2, d, h)
        out[q + "self_attn.q_proj.weight"] = w[:, :qpk].reshape(-1, h)
        out[q + "self_attn.k_proj.weight"] = w[:, qpk].reshape(-1, h)
        out[q + "self_attn.v_proj.weight"] = w[:, qpk + 1].reshape(-1, h)
        if cfg.qkv_bias:
            b = sd[p + "attn.qkv.bias"].view(cfg.num_kv_heads, qpk + 2, d)
            out[q + "self_attn.q_proj.bias"] = b[:, :qpk].reshape(-1)
            out[q + "self_attn.k_proj.bias"] = b[:, qpk].reshape(-1)
            out[q + "self_attn.v_proj.bias"] = b[:, qpk + 1].reshape(-1)
        out[q + "self_attn.o_proj.weight"] = sd[p + "attn.proj.weight"]
        if cfg.qk_norm:
            out[q + "self_attn.q_norm.weight"] = sd[p + "attn.q_norm.weight"]
            out[q + "self_attn.k_norm.weight"] = sd[p + "attn.k_norm.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "mlp_norm.weight"]
        if is_hf_moe_layer(cfg, i):
            out.update(moe_block_to_hf(sd, cfg, arch, i))
            continue
        out[q + "mlp.gate_proj.weight"] = sd[p + "mlp.gate_up.weight"][0]
        out[q + "mlp.up_proj.weight"] = sd[p + "mlp.gate_up.weight"][1]
        out[q + "mlp.down_proj.weight"] = sd[p + "mlp.down.weight"]
    if cfg.num_labels:
        out["score.weight"] = sd["score.weight"]
    elif not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors → our full state dict. Every HF tensor must be used exactly once."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise UnsupportedModelError(f"the HF checkpoint has no tensor {key!r}; it does not match its config.")
        used.add(key)
        return hf[key]

    qpk, d, h = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    out = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    for i in range(cfg.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        qw = take(q + "self_attn.q_proj.weight").view(cfg.num_kv_heads, qpk, d, h)
        kw = take(q + "self_attn.k_proj.weight").view(cfg.num_kv_heads, 1, d, h)
        vw = take(q + "self_attn.v_proj.weight").view(cfg.num_kv_heads, 1, d, h)
        out[p + "attn.qkv.weight"] = torch.cat([qw, kw, vw], dim=1).reshape(-1, h)
        if cfg.qkv_bias:
            qb = take(q + "self_attn.q_proj.bias").view(cfg.num_kv_heads, qpk, d)
            kb = take(q + "self_attn.k_proj.bias").view(cfg.num_kv_heads, 1, d)
            vb = take(q + "self_attn.v_proj.bias").view(cfg.num_kv_heads, 1, d)
            out[p + "attn.qkv.bias"] = torch.cat([qb, kb, vb], dim=1).reshape(-1)
        out[p + "attn.proj.weight"] = take(q + "self_attn.o_proj.weight")
        if cfg.qk_norm:
            out[p + "attn.q_norm.weight"] = take(q + "self_attn.q_norm.weight")
            out[p + "attn.k_norm.weight"] = take(q + "self_attn.k_norm.weight")
        out[p + "attn_norm.weight"] = take(q + "input_layernorm.weight")
        out[p + "mlp_norm.weight"] = take(q + "post_attention_layernorm.weight")
        if is_hf_moe_layer(cfg, i):
            out.update(moe_block_from_hf(take, hf.__contains__, cfg, export_architecture(cfg), i))
            continue
        out[p + "mlp.gate_up.weight"] = torch.stack([take(q + "mlp.gate_proj.weight"), take(q + "mlp.up_proj.weight")])
        out[p + "mlp.down.weight"] = take(q + "mlp.down_proj.weight")
    if cfg.num_labels:
        out["score.weight"] = take("score.weight")
    elif not cfg.tie_embeddings:
        out["head.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in hf:  # some tied checkpoints store the shared tensor twice
        if not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
            raise UnsupportedModelError("tie_word_embeddings = true but lm_head.weight differs from the embedding.")
        used.add("lm_head.weight")
    leftover = sorted(k for k in set(hf) - used if "rotary_emb" not in k)
    if leftover:
        raise UnsupportedModelError(f"HF tensors this model has no place for: {', '.join(leftover[:6])}"
                                    f"{' …' if len(leftover) > 6 else ''}")
    return {k: v.contiguous() for k, v in out.items()}
