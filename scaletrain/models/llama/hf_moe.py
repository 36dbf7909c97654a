"""Hugging Face interop of the mixture-of-experts families: Qwen3MoeForCausalLM and MixtralForCausalLM.

`models/llama/hf.py` maps the attention, norms and embeddings as for the dense families; this module
maps what differs: the MoE config fields and the feed-forward block of each MoE layer.

Config fields:
  Qwen3-MoE  num_experts, num_experts_per_tok, norm_topk_prob, moe_intermediate_size (the experts' width;
             intermediate_size is the dense MLP of mlp_only_layers), decoder_sparse_step (→ layer_freq),
             mlp_only_layers (only a leading run 0..n-1, → first_dense_layers), router_aux_loss_coef.
  Mixtral    num_local_experts, num_experts_per_tok, intermediate_size (every layer is MoE, all experts
             this width), router_aux_loss_coef; router_jitter_noise must be 0 (not implemented).
  Both route by softmax over the experts, then top-k: Mixtral always renormalises the k weights, Qwen3-MoE
  where norm_topk_prob. router_aux_loss_coef ↔ model.moe.aux_loss_coef one to one, as Megatron-Bridge
  maps it (transformers pools its balancing loss over layers, scaletrain sums Megatron's per layer).

Tensors of a MoE layer i (HF hub layout — one matrix per expert — which transformers 5 also writes;
its in-memory fused `experts.gate_up_proj` [E, 2f, h] / `experts.down_proj` [E, h, f] are read too):
  Qwen3-MoE  model.layers.i.mlp.gate.weight [E, h]          ↔ layers.i.mlp.router.weight
             model.layers.i.mlp.experts.e.{gate,up}_proj.weight [f, h]  ↔ layers.i.mlp.experts.gate_up[e, 0|1]
             model.layers.i.mlp.experts.e.down_proj.weight [h, f]       ↔ layers.i.mlp.experts.down[e]
  Mixtral    model.layers.i.block_sparse_moe.gate.weight    ↔ layers.i.mlp.router.weight
             ….block_sparse_moe.experts.e.w1 (gate), w3 (up), w2 (down), same shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from scaletrain.config.moe import MoEConfig, is_moe_layer
from scaletrain.config.schema import ModelConfig

QWEN3_MOE, MIXTRAL = "Qwen3MoeForCausalLM", "MixtralForCausalLM"
MOE_ARCHITECTURES = {QWEN3_MOE: "qwen3_moe", MIXTRAL: "mixtral"}
# HF names of one expert's gate, up and down projections, and of the block's prefix, per architecture.
_EXPERT = {QWEN3_MOE: ("mlp.", "gate_proj", "up_proj", "down_proj"), MIXTRAL: ("block_sparse_moe.", "w1", "w3", "w2")}


class MoEConversionError(ValueError):
    """An MoE option the HF class cannot express, or the converter cannot reproduce; the message names it."""


def _experts(hf: dict[str, Any], default: int) -> int:
    """Both configs accept either name (transformers 5 writes num_local_experts; Qwen's hub files num_experts)."""
    return int(hf.get("num_experts") or hf.get("num_local_experts") or default)


def moe_from_hf(arch: str, hf: dict[str, Any]) -> tuple[MoEConfig, int]:
    """(model.moe, model.ffn_hidden_size) of a Qwen3-MoE or Mixtral config.json."""
    coef = float(hf.get("router_aux_loss_coef", 0.001))
    if arch == MIXTRAL:
        if float(hf.get("router_jitter_noise") or 0.0):
            raise MoEConversionError(f"router_jitter_noise = {hf['router_jitter_noise']} is not implemented "
                                     "(multiplicative noise on the router's input in training); set it to 0.")
        ffn = hf["intermediate_size"]
        return MoEConfig(num_experts=_experts(hf, 8), top_k=hf.get("num_experts_per_tok", 2),
                         score_fn="softmax", norm_topk=True, expert_ffn_hidden_size=ffn, aux_loss_coef=coef), ffn
    layers = hf["num_hidden_layers"]
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise MoEConversionError(f"mlp_only_layers = {dense}: only a leading run of dense layers (0 … n−1) is "
                                 "implemented (model.moe.first_dense_layers).")
    moe = MoEConfig(num_experts=_experts(hf, 128), top_k=hf.get("num_experts_per_tok", 8),
                    score_fn="softmax", norm_topk=bool(hf.get("norm_topk_prob", False)),
                    expert_ffn_hidden_size=hf.get("moe_intermediate_size", 768), aux_loss_coef=coef,
                    layer_freq=hf.get("decoder_sparse_step", 1), first_dense_layers=len(dense))
    if not any(is_moe_layer(moe, i) for i in range(layers)):
        raise MoEConversionError("no layer of this Qwen3-MoE config is a MoE layer (mlp_only_layers / "
                                 "decoder_sparse_step); import it as a dense model instead.")
    return moe, hf["intermediate_size"]


def moe_to_hf(arch: str, cfg: ModelConfig) -> dict[str, Any]:
    """The MoE fields of config.json for `arch`; refuses what that class cannot express."""
    moe = cfg.moe
    expert_ffn = moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
    problems = []
    if moe.score_fn != "softmax":
        problems.append(f"model.moe.score_fn = {moe.score_fn!r} (both classes route by softmax)")
    if moe.shared_ffn_hidden_size:
        problems.append("a shared expert (model.moe.shared_ffn_hidden_size)")
    if moe.bias_update_rate:
        problems.append("aux-loss-free selection biases (model.moe.bias_update_rate), which choose other experts")
    if arch == MIXTRAL:
        if not moe.norm_topk:
            problems.append("model.moe.norm_topk = false (Mixtral renormalises the top-k weights)")
        if moe.layer_freq != 1 or moe.first_dense_layers:
            problems.append("dense layers (model.moe.layer_freq / first_dense_layers): every Mixtral layer is MoE")
        if expert_ffn != cfg.ffn_hidden_size:
            problems.append("model.moe.expert_ffn_hidden_size ≠ model.ffn_hidden_size (Mixtral has one width)")
    if problems:
        raise MoEConversionError(f"{arch} cannot express: {'; '.join(problems)}.")
    if arch == MIXTRAL:
        return {"num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
                "router_aux_loss_coef": moe.aux_loss_coef, "router_jitter_noise": 0.0, "output_router_logits": False}
    return {"num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.norm_topk,
            "moe_intermediate_size": expert_ffn, "decoder_sparse_step": moe.layer_freq,
            "mlp_only_layers": list(range(moe.first_dense_layers)), "router_aux_loss_coef": moe.aux_loss_coef,
            "output_router_logits": False}


def is_hf_moe_layer(cfg: ModelConfig, index: int) -> bool:
    return is_moe_layer(cfg.moe, index)


def moe_block_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig, arch: str, i: int) -> dict[str, torch.Tensor]:
    """HF tensors of MoE layer i's feed-forward block, from our full state dict."""
    block, gate, up, down = _EXPERT[arch]
    p, q = f"layers.{i}.mlp.", f"model.layers.{i}.{block}"
    out = {q + "gate.weight": sd[p + "router.weight"]}
    gate_up, down_w = sd[p + "experts.gate_up"], sd[p + "experts.down"]
    for e in range(cfg.moe.num_experts):
        out[f"{q}experts.{e}.{gate}.weight"] = gate_up[e, 0]
        out[f"{q}experts.{e}.{up}.weight"] = gate_up[e, 1]
        out[f"{q}experts.{e}.{down}.weight"] = down_w[e]
    return out


def moe_block_from_hf(take: Callable[[str], torch.Tensor], has: Callable[[str], bool], cfg: ModelConfig, arch: str,
                      i: int) -> dict[str, torch.Tensor]:
    """Our tensors of MoE layer i's feed-forward block; `take` marks an HF tensor used (every one must be)."""
    block, gate, up, down = _EXPERT[arch]
    p, q = f"layers.{i}.mlp.", f"model.layers.{i}.{block}"
    out = {p + "router.weight": take(q + "gate.weight")}
    e_count, f = cfg.moe.num_experts, cfg.moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
    if has(q + "experts.gate_up_proj"):  # transformers 5's in-memory layout: [E, 2f, h] (gate rows first)
        out[p + "experts.gate_up"] = take(q + "experts.gate_up_proj").reshape(e_count, 2, f, cfg.hidden_size)
        out[p + "experts.down"] = take(q + "experts.down_proj")
        return out
    out[p + "experts.gate_up"] = torch.stack([
        torch.stack([take(f"{q}experts.{e}.{gate}.weight"), take(f"{q}experts.{e}.{up}.weight")])
        for e in range(e_count)])
    out[p + "experts.down"] = torch.stack([take(f"{q}experts.{e}.{down}.weight") for e in range(e_count)])
    return out
