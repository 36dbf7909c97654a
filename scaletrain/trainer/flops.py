"""Model FLOPs per token and MFU, under one documented convention.

Convention (PaLM, Chowdhery et al. 2022, appendix B): training FLOPs per token =
6·N + 12·L·H·Q·T, where N counts the parameters that take part in matmuls (every weight except the
input embedding table; the output head is counted even when tied to the embedding), L layers,
H query heads, Q head dim, T sequence length. The attention term counts the full T×T score matrix;
`causal_halved=True` halves it (6·L·H·Q·T), the count of work a causal kernel actually does. MFU is
reported under the PaLM convention. E.g. Llama-3-8B at T = 8192: 57.9 GFLOP (PaLM), 51.5 (halved).

Mixture of experts (model.moe): N counts the *active* matmul parameters, those one token passes through —
in a MoE layer the router (E·h), top_k of the E routed experts and the shared expert, not the other
E − top_k experts — as Megatron-Core and the published "active parameters" do (Mixtral 8x7B: 12.9 B of
46.7 B; Qwen3-30B-A3B: 3.3 B of 30.5 B, both counting the embedding and the head). MFU is then the work
the model needs per token, not the work a capacity-padded or token-dropping dispatch happens to do.
"""

from __future__ import annotations

from scaletrain.config.moe import is_moe_layer
from scaletrain.config.schema import ModelConfig

# Dense peak TFLOP/s per device (no sparsity). Unknown devices (CPUs included) get no MFU.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bfloat16": 989.0, "fp8": 1979.0},
    "H100": {"bfloat16": 989.0, "fp8": 1979.0},
    "H200": {"bfloat16": 989.0, "fp8": 1979.0},
    "H100 PCIe": {"bfloat16": 756.0, "fp8": 1513.0},
    "H100 NVL": {"bfloat16": 835.0, "fp8": 1671.0},
    "A100": {"bfloat16": 312.0},
    "B200": {"bfloat16": 2250.0, "fp8": 4500.0},
}


def mlp_params(cfg: ModelConfig, index: int) -> tuple[int, int]:
    """(parameters, active parameters per token) of layer `index`'s feed-forward block: the dense SwiGLU, or
    a mixture of experts (router, routed experts, shared expert)."""
    h, moe = cfg.hidden_size, cfg.moe
    if not is_moe_layer(moe, index):
        return 3 * h * cfg.ffn_hidden_size, 3 * h * cfg.ffn_hidden_size
    expert = 3 * h * (moe.expert_ffn_hidden_size or cfg.ffn_hidden_size)
    fixed = moe.num_experts * h + 3 * h * moe.shared_ffn_hidden_size  # router + shared expert
    return fixed + moe.num_experts * expert, fixed + moe.top_k * expert


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of the resolved model config: total, embedding, matmul (N: active matmul
    parameters, see the module docstring) and active (every parameter a token passes through)."""
    h, d, layers = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    qkv = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + (cfg.num_heads + 2 * cfg.num_kv_heads) * d * cfg.qkv_bias
    attn_out = cfg.num_heads * d * h
    mlps = [mlp_params(cfg, i) for i in range(layers)]
    matmul = layers * (qkv + attn_out) + sum(a for _, a in mlps)
    norms = layers * 2 * h + h + layers * 2 * d * cfg.qk_norm  # + Qwen3's per-head q/k norms
    embedding = cfg.vocab_size * h
    head = cfg.num_labels * h if cfg.num_labels else cfg.vocab_size * h  # a reward model's score head, or the LM head
    own_head = 0 if cfg.tie_embeddings and not cfg.num_labels else head
    total = embedding + layers * (qkv + attn_out) + sum(n for n, _ in mlps) + norms + own_head
    return {"total": total, "embedding": embedding, "matmul": matmul + head,
            "active": total - sum(n - a for n, a in mlps)}  # less the experts a token does not reach


def flops_per_token(cfg: ModelConfig, seq_length: int, causal_halved: bool = False) -> float:
    """Training (forward + backward) FLOPs per token; see the module docstring for the convention."""
    n = parameter_counts(cfg)["matmul"]
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_length
    return 6.0 * n + (attn / 2 if causal_halved else attn)


def device_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Peak dense TFLOP/s of a named accelerator for bfloat16 / fp8 compute; None when unknown."""
    key = "fp8" if dtype == "fp8" else "bfloat16"
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):  # most specific name first
        if name.lower() in device_name.lower():
            return PEAK_TFLOPS[name].get(key)
    return None
