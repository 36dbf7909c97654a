"""The `model.moe` section: mixture-of-experts feed-forward blocks (nn/moe), and their up-front checks.

A model with `num_experts = 0` (the default) is dense. Otherwise the feed-forward block of every layer
`i` with `i >= first_dense_layers` and `(i + 1) % layer_freq == 0` (Hugging Face's `decoder_sparse_step`
rule) is a mixture of experts; the others keep the dense SwiGLU of `model.ffn_hidden_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

SCORE_FNS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of experts: router, experts, load balancing (model.moe.*; num_experts = 0: a dense model)."""

    num_experts: int = 0
    """Routed experts per MoE layer (0: no MoE layer, a dense model)."""
    top_k: int = 2
    """Experts each token is routed to."""
    score_fn: str = "softmax"
    """Router scores: 'softmax' over the experts (Mixtral, Qwen3-MoE) or 'sigmoid' per expert (DeepSeek-V3)."""
    norm_topk: bool = True
    """Rescale each token's top-k routing weights to sum to 1."""
    expert_ffn_hidden_size: int = 0
    """SwiGLU inner width of each routed expert (0: model.ffn_hidden_size)."""
    shared_ffn_hidden_size: int = 0
    """SwiGLU inner width of the shared expert(s) every token also passes through, unweighted (0: none;
    DeepSeek's n shared experts of width f are one of width n·f)."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch/GShard load-balancing loss E·Σ_e f_e·P_e per MoE layer (Megatron's form: f_e the
    fraction of the layer's k·tokens routed to e, P_e the mean router probability of e); 0: off."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss mean_t(logsumexp(logits_t)²) per MoE layer (ST-MoE); 0: off."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): after each step every expert's selection bias moves by this rate
    towards balance, bias_e += rate·sign(mean load − load_e), from the step's global token counts; the bias only
    chooses experts, never weights them. 0: off."""
    capacity_factor: float = 0.0
    """Token dropping in training: an expert takes at most ceil(capacity_factor·k·tokens/E) of a microbatch's
    tokens (those of highest routing weight; the rest pass through the residual only). 0: dropless. Evaluation
    and decoding are always dropless, so KV-cache decoding equals recomputation."""
    layer_freq: int = 1
    """Every layer_freq-th layer ((i + 1) % layer_freq == 0) is a MoE layer."""
    first_dense_layers: int = 0
    """The first N layers stay dense (DeepSeek's first_k_dense_replace)."""


def is_moe_layer(moe: MoEConfig, index: int) -> bool:
    """Whether layer `index` (global, 0-based) has a mixture-of-experts feed-forward block."""
    return moe.num_experts > 0 and index >= moe.first_dense_layers and (index + 1) % moe.layer_freq == 0


def moe_errors(moe: MoEConfig, *, num_layers: int, tp: int, ep: int, ffn_hidden_size: int) -> list[str]:
    """Every problem of the model.moe section (and parallel.ep against it), each naming the fix."""
    errors: list[str] = []
    if moe.num_experts < 0:
        errors.append(f"model.moe.num_experts = {moe.num_experts} must be 0 (dense) or more.")
    if ep > 1 and moe.num_experts == 0:
        errors.append(f"parallel.ep = {ep} shards experts, and the model has none: set model.moe.num_experts "
                      "or parallel.ep = 1.")
    if moe.num_experts <= 0:
        return errors
    if not 1 <= moe.top_k <= moe.num_experts:
        errors.append(f"model.moe.top_k = {moe.top_k} must be between 1 and model.moe.num_experts = {moe.num_experts}.")
    if moe.score_fn not in SCORE_FNS:
        errors.append(f"model.moe.score_fn = {moe.score_fn!r}: choose one of {', '.join(SCORE_FNS)}.")
    if moe.num_experts % ep:
        errors.append(f"model.moe.num_experts = {moe.num_experts} is not divisible by parallel.ep = {ep}; "
                      "each ep rank holds an equal share of the experts.")
    expert_ffn = moe.expert_ffn_hidden_size or ffn_hidden_size
    for key, value in (("model.moe.expert_ffn_hidden_size", expert_ffn),
                       ("model.moe.shared_ffn_hidden_size", moe.shared_ffn_hidden_size)):
        if value < 0:
            errors.append(f"{key} = {value} must be 0 or more.")
        elif value % tp:
            errors.append(f"{key} = {value} is not divisible by parallel.tp = {tp} (experts are tp-sharded "
                          "like the dense MLP).")
    coefs: tuple[tuple[str, float], ...] = (("aux_loss_coef", moe.aux_loss_coef), ("z_loss_coef", moe.z_loss_coef),
                                            ("bias_update_rate", moe.bias_update_rate),
                                            ("capacity_factor", moe.capacity_factor))
    for key, coef in coefs:
        if coef < 0:
            errors.append(f"model.moe.{key} = {coef} must be 0 or more.")
    if moe.layer_freq < 1:
        errors.append(f"model.moe.layer_freq = {moe.layer_freq} must be at least 1.")
    elif not any(is_moe_layer(moe, i) for i in range(num_layers)):
        errors.append(f"model.moe.first_dense_layers = {moe.first_dense_layers} and layer_freq = {moe.layer_freq} "
                      f"leave none of the {num_layers} layers a MoE layer; lower them or set num_experts = 0.")
    return errors
