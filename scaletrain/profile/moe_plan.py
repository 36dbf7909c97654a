"""The planner's mixture-of-experts terms: expert memory per rank, all-to-all bytes, layout warnings.

`profile/planner.py` calls these for a model with `model.moe.num_experts > 0`; for a dense model every
function returns zeros and no notes. FLOPs are counted on active parameters by `trainer/flops.py` (the
router, top_k routed experts and the shared expert of each MoE layer; see its docstring).

Conventions, on top of the planner's (all bytes per rank):
- Routed experts are sharded over `parallel.ep` (E/ep whole experts per rank, taken from dp·cp) and each
  expert's SwiGLU over tp like the dense MLP (expert-tp = tp); the router (E·h) is replicated. Where
  E is not a multiple of ep the busiest rank holds ceil(E/ep) experts (and a warning says so).
- Expert gradients are reduced, and under ZeRO-1 their optimizer state sharded, over the expert-data-
  parallel group, edp = dp·cp/ep ranks; every other parameter over dp·cp as in a dense model. Element
  sizes are the planner's (profile/footprint.py `Bytes`): weights in the parameter dtype (bf16 by
  default), gradients in the main dtype (fp32 main grads), AdamW state per footprint.optimizer_bytes;
  ZeRO-1's reduce-scatter sends main-dtype gradients and its all-gather parameter-dtype weights.
- Activations of a MoE layer per token, dropless and balanced (measured with saved-tensor hooks): each
  of the top_k copies keeps its permuted input (h), the fused gate/up output, silu(gate) and their product
  (4·f_e/tp), the expert output the weighted scatter-add keeps (h; nn/moe/scatter.py recomputes the weighted
  copy plain `index_add` would keep), in the compute dtype, its weight (fp32, and a compute-dtype copy) and
  three int64 indices (expert id, token, sort order); per token the router's logits and probabilities (2·E, fp32), the top-k weights' sum
  and the log-sum-exp of the z-loss (fp32), the router's fp32 copy of its input under bf16 (h), and the
  shared expert's 4·f_s/tp. It replaces the dense MLP's 4·ffn/tp (3·ffn/tp under selective 'mlp_act', which leaves experts alone:
  neither routed nor shared experts expose an `activation` region to recompute).
- All-to-all (the `ep` entry of the communication table): per MoE layer and microbatch a rank dispatches
  each of its tokens' top_k copies and receives them back combined, h values each in the compute dtype;
  under balanced routing 1/ep of the copies stay on the rank, so each direction sends
  tokens·top_k·h·(ep−1)/ep values. Forward: dispatch + combine; backward: their gradients (the same bytes
  again); full recomputation repeats the forward pair. Every tp rank routes its cp rank's whole microbatch
  (the MoE block gathers the sequence under SP first, and each tp rank sends its partial expert outputs
  back), so tp does not divide these bytes. Values travel in the compute dtype.
"""

from __future__ import annotations

from scaletrain.config.moe import MoEConfig, is_moe_layer
from scaletrain.config.schema import ModelConfig
from scaletrain.profile.footprint import Bytes, Layout

NODE_GPUS = 8  # ranks of one NVLink domain: all-to-all beyond it crosses the inter-node network


def moe_section(m: ModelConfig) -> MoEConfig | None:
    """The model's MoE section when it has experts (None: a dense model)."""
    return m.moe if m.moe.num_experts > 0 else None


def is_moe(m: ModelConfig, index: int) -> bool:
    return is_moe_layer(m.moe, index)


def experts_per_rank(m: ModelConfig, ep: int) -> int:
    """Routed experts the busiest ep rank holds per MoE layer."""
    moe = moe_section(m)
    return 0 if moe is None else -(-moe.num_experts // ep)


def stage_moe_params(m: ModelConfig, tp: int, ep: int, layer_indices: list[int]) -> tuple[int, int]:
    """(change of a rank's parameter count against dense MLPs in these layers, routed-expert parameters it
    holds) — what `planner.stage_params` adds for a MoE model."""
    moe = moe_section(m)
    if moe is None:
        return 0, 0
    h = m.hidden_size
    f_e = moe.expert_ffn_hidden_size or m.ffn_hidden_size
    dense = 3 * h * m.ffn_hidden_size // tp
    fixed = moe.num_experts * h + 3 * h * moe.shared_ffn_hidden_size // tp  # router (replicated) + shared expert
    experts = experts_per_rank(m, ep) * 3 * h * f_e // tp
    n_moe = sum(1 for i in layer_indices if is_moe(m, i))
    return n_moe * (fixed + experts - dense), n_moe * experts


def moe_activation_delta(m: ModelConfig, layout: Layout, tokens: int, compute_bytes: int,
                         layer_indices: list[int]) -> int:
    """Bytes the MoE layers among `layer_indices` save for backward beyond a dense MLP's (which
    footprint.activation_bytes_per_layer already counts), for a microbatch of `tokens` tokens on this rank."""
    moe = moe_section(m)
    if moe is None:
        return 0
    tp = layout.tp
    f_e = (moe.expert_ffn_hidden_size or m.ffn_hidden_size) // tp
    dense = (3 if layout.recompute == "selective" and "mlp_act" in layout.recompute_modules else 4) * m.ffn_hidden_size
    h, cb = m.hidden_size, compute_bytes
    per_copy = (2 * h + 4 * f_e) * cb + 4 + cb + 3 * 8  # input, SwiGLU 4·f_e, output; weight; 3 indices
    router = 2 * moe.num_experts * 4 + 2 * 4 + (4 * h if cb < 4 else 0)
    per_token = moe.top_k * per_copy + router + (4 * moe.shared_ffn_hidden_size // tp - dense // tp) * cb
    return tokens * per_token * sum(1 for i in layer_indices if is_moe(m, i))


def all_to_all_bytes(m: ModelConfig, ep: int, recompute: bool, tokens: int, microbatches: int, compute_bytes: int,
                     layer_indices: list[int]) -> int:
    """Bytes a rank sends per step in the dispatch/combine all-to-alls of its stage's MoE layers (tokens: its
    cp rank's share of a microbatch)."""
    moe = moe_section(m)
    if moe is None or ep == 1:
        return 0
    one_way = tokens * moe.top_k * m.hidden_size * compute_bytes * (ep - 1) / ep
    passes = 4 + (2 if recompute else 0)  # dispatch + combine, forward and backward (+ the recomputed forward)
    return int(one_way * passes * microbatches * sum(1 for i in layer_indices if is_moe(m, i)))


def grad_sync_bytes(params: int, ranks: int, zero: bool, b: Bytes) -> float:
    """Bytes a rank sends to synchronise `params` parameters' gradients over `ranks` ranks: a main-dtype
    all-reduce, or under ZeRO-1 a main-dtype reduce-scatter plus a parameter-dtype all-gather."""
    if zero:
        return (ranks - 1) / ranks * params * (b.main + b.param)
    return 2 * (ranks - 1) / ranks * params * b.main


def moe_comm(m: ModelConfig, layout: Layout, b: Bytes, tokens: int, microbatches: int,
             stages: list[tuple[int, int, list[int]]]) -> dict[str, int]:
    """The `dp` and `ep` entries of the planner's communication table for a MoE model. stages: (parameters,
    routed-expert parameters, layer indices) per pipeline stage; the busiest stage counts. Dense parameters'
    gradients are synchronised over dp·cp, the experts' over the edp expert-data-parallel ranks."""
    params, experts, _ = max(stages, key=lambda s: s[0])
    grads = (grad_sync_bytes(params - experts, layout.dp * layout.cp, layout.zero, b)
             + grad_sync_bytes(experts, layout.edp, layout.zero, b))
    a2a = max(all_to_all_bytes(m, layout.ep, layout.recompute == "full", tokens, microbatches, b.compute, layers)
              for _, _, layers in stages)
    return {"dp": int(grads), "ep": a2a}


def moe_notes(m: ModelConfig, layout: Layout, stage_layers: list[list[int]]) -> list[str]:
    """Warnings about a layout that leaves experts (or their work) unevenly spread, and the expert layout."""
    moe = moe_section(m)
    if moe is None:
        return []
    tp, pp, ep, dp_cp = layout.tp, layout.pp, layout.ep, layout.dp * layout.cp
    e = moe.num_experts
    notes = [f"MoE: {e} experts, top-{moe.top_k}; {experts_per_rank(m, ep)} per ep rank (ep{ep}), "
             f"expert gradients reduced over {layout.edp} expert-data-parallel ranks"]
    if e % ep:
        notes.append(f"imbalanced experts: num_experts = {e} is not divisible by ep = {ep}; ranks hold "
                     f"{e // ep} or {-(-e // ep)} experts (validation refuses this layout)")
    if ep > dp_cp or dp_cp % ep:
        notes.append(f"ep = {ep} does not divide dp·cp = {dp_cp}: experts cannot be sharded over the data ranks")
    if ep > e:
        notes.append(f"ep = {ep} exceeds num_experts = {e}: some ep ranks would hold no expert")
    if ep * tp > NODE_GPUS:
        notes.append(f"ep·tp = {ep * tp} > {NODE_GPUS}: the all-to-all crosses the NVLink domain of a node")
    per_stage = [sum(1 for i in layers if is_moe(m, i)) for layers in stage_layers]
    if pp > 1 and len(set(per_stage)) > 1:
        notes.append(f"MoE layers per pipeline stage {per_stage}: stages hold unequal expert memory and work")
    if moe.top_k * 4 < e and moe.capacity_factor == 0 and ep > 1:
        notes.append("dropless routing: an expert's tokens per step vary with the router, so the busiest ep rank "
                     "computes (and holds activations for) more than the balanced share counted here")
    return notes
