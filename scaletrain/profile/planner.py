"""Analytic planner: what a config and layout cost per rank, without running it.

For any run config and world size: parameter counts, FLOPs per token under both conventions (PaLM
6N + 12·L·H·Q·T, and the causal-halved count), per-rank memory for every pipeline stage (weights,
gradients, optimizer state with or without ZeRO-1, activations with or without full recomputation,
times the microbatches the schedule keeps in flight), per-step communication volume per parallel
dimension, and the pipeline bubble. Flags layouts that do not fit a given device memory.

Conventions (all bytes are per rank):
- Weights in the parameter dtype: bf16 in bf16 runs (precision.params = 'bf16', the default; 'fp32' keeps
  fp32 weights under autocast), else the run's dtype. Gradients in the main dtype (the dp buckets: fp32
  main grads for bf16 weights). AdamW: two moments in the parameter dtype for fp32/float64 weights; for
  bf16 weights fp32 master weights and two fp32 moments; ZeRO-1 keeps master weights and moments for 1/(dp·cp)
  of the rank's parameters — for 1/edp of its routed experts' (edp = dp·cp/ep, the expert-data-parallel
  ranks). FP8: Transformer Engine caches an FP8 copy of each block weight and its transpose (2 bytes per
  parameter; routed experts are no TE linears) and cuBLAS workspaces; torchao casts per GEMM (transient).
- Activations and the loss: profile/footprint.py says what a block and the loss save per token.
- Communication is the bytes each rank sends per step with ring collectives: all-reduce 2(n-1)/n of
  the buffer, all-gather / reduce-scatter (n-1)/n; pipeline point-to-point is the activation sent
  forward plus its gradient sent back at each stage boundary; cp all-gathers keys and values forward
  and reduce-scatters their gradients back; gradients (and ZeRO-1 shards) span dp × cp.
- Rollouts (GRPO, PPO, on-policy distillation) happen between steps, when no training activation is
  live: a stage's peak is its static memory plus the larger of its activations and its rollout memory.
  Rollout memory is the KV cache of every row this rank decodes (the replica's completions per step,
  split over cp — rows are sampled whole, each cp rank a share — up to train.seq_length positions, keys
  and values of this rank's kv heads for the layers of its stage, in the compute dtype; only where
  decoding is incremental: the torch backend — SP is lifted for decoding) plus, on the last stage, one
  sampling pass's logits (posttrain.rollout.micro_batch rows) over this rank's vocabulary slice: at the
  last position only when decoding is incremental, at every position where each token recomputes its
  prefix.
- Mixture of experts (model.moe): FLOPs on active parameters, expert memory per rank over parallel.ep,
  the dispatch/combine all-to-all bytes and the layout warnings come from profile/moe_plan.py (its
  docstring states those conventions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from scaletrain.config.schema import ModelConfig, RunConfig
from scaletrain.parallel.pipeline.schedules import BWD, FWD, schedule_order
from scaletrain.parallel.pipeline.split import layer_layout
from scaletrain.profile.footprint import (
    Bytes,
    Layout,
    activation_bytes_per_layer,
    byte_sizes,
    loss_bytes,
    optimizer_bytes,
)
from scaletrain.profile.moe_plan import (
    moe_activation_delta,
    moe_comm,
    moe_notes,
    moe_section,
    stage_moe_params,
)
from scaletrain.trainer.flops import flops_per_token, parameter_counts

TE_WORKSPACE_BYTES = 3 * 32 * 2**20  # Transformer Engine / cuBLAS GEMM workspaces (one per stream)


@dataclass
class StagePlan:
    """Per-rank figures of one pipeline stage (every tp/dp rank of the stage holds the same)."""

    pp_rank: int
    layers: int
    params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes_per_microbatch: int
    microbatches_in_flight: int
    activations_bytes: int
    # FP8 weight copies (Transformer Engine) and library workspaces.
    fp8_bytes: int = 0
    # Companion models of post-training (a distillation teacher and its stored outputs, a reference policy,
    # a reward model, PPO's critic with its gradients and AdamW state), on this stage.
    companion_bytes: int = 0
    # Rollouts (between steps, when activations are freed): the KV cache of the rows this rank decodes,
    # and the transient logits of one pass on the last stage.
    rollout_kv_bytes: int = 0
    rollout_logits_bytes: int = 0
    expert_params: int = 0  # of `params`: routed experts (reduced and ZeRO-sharded over dp·cp/ep)

    @property
    def rollout_bytes(self) -> int:
        return self.rollout_kv_bytes + self.rollout_logits_bytes

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.fp8_bytes + self.companion_bytes
                + max(self.activations_bytes, self.rollout_bytes))


@dataclass
class Plan:
    layout: Layout
    params_total: int
    params_embedding: int
    params_matmul: int
    flops_per_token_palm: float
    flops_per_token_causal: float
    flops_per_step: float
    tokens_per_step: int
    microbatches: int
    bubble_fraction: float
    stages: list[StagePlan]
    comm_bytes_per_step: dict[str, int]
    gpu_memory_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    teacher_flops_per_token: float = 0.0  # distillation: the teacher's forward pass (PaLM convention), not in MFU
    params_active: int = 0  # parameters one token passes through (a MoE model's top_k experts of E)

    @property
    def peak_stage(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total_bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory_bytes is None else self.peak_stage.total_bytes <= self.gpu_memory_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["peak_stage_bytes"] = self.peak_stage.total_bytes
        d["fits"] = self.fits
        for s, sd in zip(self.stages, d["stages"]):
            sd["total_bytes"] = s.total_bytes
            sd["rollout_bytes"] = s.rollout_bytes
        return d


def _layer_params(m: ModelConfig) -> tuple[int, int]:
    """(tp-sharded matmul parameters, replicated norm parameters) of one block."""
    d = m.head_dim
    qkv = m.hidden_size * (m.num_heads + 2 * m.num_kv_heads) * d + (m.num_heads + 2 * m.num_kv_heads) * d * m.qkv_bias
    sharded = qkv + m.num_heads * d * m.hidden_size + 3 * m.hidden_size * m.ffn_hidden_size
    return sharded, 2 * m.hidden_size + 2 * d * m.qk_norm


def stage_layers(m: ModelConfig, layout: Layout, pp_rank: int) -> list[int]:
    """Global indices of the layers on pipeline stage `pp_rank`."""
    return [i for chunk in layer_layout(m.num_layers, layout.pp, layout.vpp)[pp_rank] for i in chunk]


def stage_params(m: ModelConfig, layout: Layout, pp_rank: int) -> tuple[int, int]:
    """(parameters this rank holds, its layer count) on pipeline stage `pp_rank`."""
    indices = stage_layers(m, layout, pp_rank)
    layers = len(indices)
    sharded, replicated = _layer_params(m)
    n = layers * (sharded // layout.tp + replicated) + stage_moe_params(m, layout.tp, layout.ep, indices)[0]
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    table = m.vocab_size * m.hidden_size // layout.tp
    if first:
        n += table
    if last:
        n += m.hidden_size  # final norm
        if m.num_labels:  # a reward model's replicated score head
            n += m.num_labels * m.hidden_size
        elif not m.tie_embeddings or not first:  # own head, or the tied copy on the last stage
            n += table
    return n, layers


def rollout_rows(cfg: RunConfig, layout: Layout, group: int) -> int:
    """Rows one rank decodes per rollout batch: the replica's completions (global batch / dp), each cp
    rank a contiguous share padded to whole passes; 0 for stages without rollouts (`group` 0: the stage's
    completions per prompt, `Stage.rollout_group`)."""
    pt, t = cfg.posttrain, cfg.train
    if not group:
        return 0
    rows = t.global_batch_size // layout.dp
    if layout.cp > 1:
        prompts = -(-(rows // group) // layout.cp)
        unit = (pt.rollout.micro_batch or t.micro_batch_size) * (layout.pp if layout.vpp > 1 else 1)
        while (prompts * group) % unit:  # whole passes: padded with copies of the last prompt
            prompts += 1
        rows = prompts * group
    return rows


def rollout_bytes(cfg: RunConfig, layout: Layout, pp_rank: int, layers: int, compute_bytes: int,
                  group: int) -> tuple[int, int]:
    """(KV-cache bytes, logits bytes) of this stage's rank during a rollout (see the module docstring)."""
    m, t = cfg.model, cfg.train
    rows = rollout_rows(cfg, layout, group)
    if not rows:
        return 0, 0
    micro = cfg.posttrain.rollout.micro_batch or t.micro_batch_size  # rows per sampling forward
    incremental = cfg.parallel.backend != "te"  # any layout on the torch backend (SP is lifted for decoding)
    kv = rows * t.seq_length * layers * 2 * (m.num_kv_heads // layout.tp) * m.head_dim * compute_bytes \
        if incremental else 0
    positions = 1 if incremental else t.seq_length  # a KV-cache pass computes the last position's logits only
    logits = micro * positions * (m.vocab_size // layout.tp) * compute_bytes \
        if pp_rank == layout.pp - 1 else 0
    return kv, logits


def peak_in_flight(pp: int, vpp: int, pp_rank: int, microbatches: int) -> int:
    """Most chunk-forwards whose backward has not run yet, on this rank, under the trainer's schedule."""
    if pp == 1:
        return 1  # gradient accumulation frees each microbatch before the next
    live = peak = 0
    for kind, _, _ in schedule_order(pp, vpp, pp_rank, microbatches):
        live += 1 if kind == FWD else -1 if kind == BWD else 0
        peak = max(peak, live)
    return peak


def plan(cfg: RunConfig, world_size: int, *, gpu_memory_gb: float | None = None,
         compute_dtype: str | None = None, teacher: ModelConfig | None = None,
         frozen: tuple[ModelConfig, ...] = (), trainable: tuple[ModelConfig, ...] = (), rollout_group: int = 0) -> Plan:
    """The plan of a resolved run config (model sizes derived) on `world_size` ranks.

    Companion models, each in the run's layout and parameter dtype: `teacher` (distillation: its weights,
    and on the last stage its outputs for all the step's microbatches — dense logits over this rank's
    vocabulary slice in the compute dtype, or top-k int64 ids + fp32 log-probs), `frozen` (weights only:
    a reference policy, a reward model) and `trainable` (weights, gradients and AdamW's two moments:
    PPO's critic). Their forward-only activations are transient and not counted. rollout_group: completions
    sampled per prompt each step (the run's `Stage.rollout_group`; 0: no rollouts)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dp = world_size // (p.tp * p.pp * p.cp)
    layout = Layout(p.tp, p.pp, p.vpp, dp, p.cp, p.sequence_parallel and p.tp > 1, cfg.optim.distributed,
                    p.recompute, tuple(p.recompute_modules), p.ep)
    b = byte_sizes(cfg, compute_dtype)
    param_bytes, compute_bytes = b.param, b.compute
    counts = parameter_counts(m)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    tokens_mb = t.micro_batch_size * t.seq_length // p.cp  # this rank's share of a microbatch
    fused_ce = any(k in ("cross_entropy", "all") for k in p.kernels)

    stages = []
    for r in range(p.pp):
        n, layers = stage_params(m, layout, r)
        indices = stage_layers(m, layout, r)
        moe_delta, experts = stage_moe_params(m, layout.tp, layout.ep, indices)
        weights, grads = n * param_bytes, n * b.main
        # AdamW state per parameter (footprint.optimizer_bytes); ZeRO-1 shards the routed experts' over edp.
        optimizer = (optimizer_bytes(n - experts, b, layout.zero, dp * p.cp)
                     + optimizer_bytes(experts, b, layout.zero, layout.edp))
        fp8 = 0
        if cfg.precision.fp8 and cfg.precision.fp8_backend == "te":
            # FP8 copies of each block weight and its transpose (not of routed experts: no TE linears), and
            # cuBLAS/TE workspaces.
            fp8 = 2 * (layers * (_layer_params(m)[0] // p.tp) + moe_delta - experts) + TE_WORKSPACE_BYTES
        per_layer = activation_bytes_per_layer(m, layout, tokens_mb, compute_bytes)
        moe_act = moe_activation_delta(m, layout, tokens_mb, compute_bytes, indices)
        if layout.recompute == "full":  # block inputs kept; one block's activations live in its backward
            div = p.tp if layout.sequence_parallel else 1
            act_mb = layers * tokens_mb * m.hidden_size * compute_bytes // div
            transient = per_layer + moe_activation_delta(m, layout, tokens_mb, compute_bytes, indices[-1:])
        else:
            act_mb, transient = layers * per_layer + moe_act, 0
        if r == p.pp - 1:
            saved, loss_transient = loss_bytes(m, layout, tokens_mb, b, fused_ce)
            act_mb += saved
            transient = max(transient, loss_transient)  # the loss's backward runs before any block's
        companions = sum(stage_params(c, layout, r)[0] for c in frozen) * param_bytes
        state = 3 * b.main if param_bytes < b.main else 2 * param_bytes  # (master weights +) two moments
        companions += sum(stage_params(c, layout, r)[0] for c in trainable) * (param_bytes + b.main + state)
        if teacher is not None:
            companions += stage_params(teacher, layout, r)[0] * param_bytes
            if r == p.pp - 1:
                k = cfg.posttrain.distill.top_k
                per_token = k * (8 + 4) if k else (m.vocab_size // p.tp) * compute_bytes
                # pipelined: the step's outputs are computed up front; otherwise one microbatch's at a time
                companions += (microbatches if p.pp > 1 else 1) * tokens_mb * per_token
                if cfg.posttrain.distill.alpha < 1.0:  # the KL's gradient is kept beside the cross-entropy's
                    act_mb += tokens_mb * max(4, param_bytes) * (m.vocab_size // p.tp)
        in_flight = peak_in_flight(p.pp, p.vpp, r, microbatches)
        # In-flight counts chunk forwards; a chunk holds 1/vpp of the stage's layers.
        chunk_share = act_mb / p.vpp if p.pp > 1 else act_mb
        activations = int(chunk_share * in_flight) + transient
        kv, logits = rollout_bytes(cfg, layout, r, layers, compute_bytes, rollout_group)
        stages.append(StagePlan(r, layers, n, weights, grads, optimizer, act_mb, in_flight, activations,
                                fp8, companions, kv, logits, experts))

    comm = _comm_bytes(m, layout, microbatches, tokens_mb, b, stages)
    if moe_section(m) is not None:  # expert gradients over the expert-dp ranks; the all-to-all of dispatch/combine
        comm.update(moe_comm(m, layout, b, tokens_mb, microbatches,
                             [(s.params, s.expert_params, stage_layers(m, layout, s.pp_rank)) for s in stages]))
    bubble = (p.pp - 1) / (p.vpp * microbatches + p.pp - 1) if p.pp > 1 else 0.0
    notes = []
    if layout.tp > 8:
        notes.append("tp > 8 crosses the NVLink domain of an 8-GPU node")
    notes += moe_notes(m, layout, [stage_layers(m, layout, r) for r in range(p.pp)])
    plan_ = Plan(layout, counts["total"], counts["embedding"], counts["matmul"], flops_per_token(m, t.seq_length),
                 flops_per_token(m, t.seq_length, causal_halved=True),
                 flops_per_token(m, t.seq_length) * t.global_batch_size * t.seq_length,
                 t.global_batch_size * t.seq_length, microbatches, bubble, stages, comm,
                 None if gpu_memory_gb is None else int(gpu_memory_gb * 2**30), notes,
                 params_active=counts["active"])
    if teacher is not None:
        plan_.teacher_flops_per_token = flops_per_token(teacher, t.seq_length) / 3  # forward only
    if plan_.fits is False:
        plan_.notes.append(f"does not fit: stage {plan_.peak_stage.pp_rank} needs "
                           f"{plan_.peak_stage.total_bytes / 2**30:.1f} GiB of {gpu_memory_gb:g} GiB")
    return plan_


def _comm_bytes(m: ModelConfig, layout: Layout, microbatches: int, tokens_mb: int, b: Bytes,
                stages: list[StagePlan]) -> dict[str, int]:
    """Bytes sent per rank per step on each axis (ring collectives), for the busiest stage. Activations
    (tp/SP collectives, pipeline messages, cp keys/values) travel in the compute dtype, gradients in the
    main dtype, ZeRO-1's parameter all-gather in the parameter dtype."""
    compute_bytes = b.compute
    t, dp, cp = layout.tp, layout.dp * layout.cp, layout.cp  # gradients are reduced over dp × cp
    layers = max(s.layers for s in stages)
    activation = tokens_mb * m.hidden_size * compute_bytes
    out = {"tp": 0, "dp": 0, "pp": 0, **({"cp": 0} if cp > 1 else {})}
    if t > 1:
        # Per block and microbatch: 2 all-reduces forward, 2 backward (or under SP 2 all-gathers + 2
        # reduce-scatters each way: the same bytes); recomputation repeats the forward ones.
        per_block = (4 + (2 if layout.recompute == "full" else 0)) * 2 * (t - 1) / t * activation
        out["tp"] = int(layers * microbatches * per_block)
    if dp > 1:
        n = max(s.params for s in stages)
        # Plain: all-reduce of the gradients. ZeRO-1: reduce-scatter of gradients + all-gather of params.
        out["dp"] = int((dp - 1) / dp * n * (b.main + b.param)) if layout.zero else int(2 * (dp - 1) / dp * n * b.main)
    if cp > 1:
        # Per block and microbatch: keys and values all-gathered forward (again under recomputation),
        # their gradients reduce-scattered back; this rank sends (cp-1)/cp of the gathered tensors.
        kv = tokens_mb * cp * 2 * (m.num_kv_heads // t) * m.head_dim * compute_bytes
        again = layout.recompute == "full" or (layout.recompute == "selective" and "core_attn" in layout.recompute_modules)
        out["cp"] = int(layers * microbatches * (2 + (1 if again else 0)) * (cp - 1) / cp * kv)
    if layout.pp > 1:
        per_boundary = activation // (t if layout.sequence_parallel else 1)
        out["pp"] = int(2 * per_boundary * microbatches * layout.vpp)  # activation forward, gradient back
    return out


def format_plan(p: Plan) -> str:
    """The planner table (GiB per rank, GB per step)."""
    lay = p.layout
    gib = 2**30
    lines = [
        f"layout: tp{lay.tp}·pp{lay.pp}{f'·vpp{lay.vpp}' if lay.vpp > 1 else ''}{f'·cp{lay.cp}' if lay.cp > 1 else ''}"
        f"{f'·ep{lay.ep}' if lay.ep > 1 else ''}·dp{lay.dp} "
        f"({lay.world_size} GPUs){' +SP' if lay.sequence_parallel else ''}{' +ZeRO-1' if lay.zero else ''}"
        f"{' +full recompute' if lay.recompute == 'full' else ''}"
        f"{(' +selective recompute (' + ', '.join(lay.recompute_modules) + ')') if lay.recompute == 'selective' else ''}",
        f"parameters: {p.params_total / 1e9:.3f} B total, {p.params_matmul / 1e9:.3f} B in "
        f"{'active ' if p.params_active < p.params_total else ''}matmuls, "
        f"{p.params_embedding / 1e9:.3f} B embedding"
        + (f"; {p.params_active / 1e9:.3f} B active per token" if p.params_active < p.params_total else ""),
        f"FLOPs/token: {p.flops_per_token_palm / 1e9:.1f} GFLOP (PaLM 6N + 12·L·H·Q·T), "
        f"{p.flops_per_token_causal / 1e9:.1f} GFLOP (causal-halved); {p.flops_per_step / 1e15:.1f} PFLOP/step "
        f"({p.tokens_per_step:,} tokens)",
        f"pipeline: {p.microbatches} microbatches per step, bubble {p.bubble_fraction:.3f}",
    ]
    distill = any(s.companion_bytes for s in p.stages)
    rollouts = any(s.rollout_bytes for s in p.stages)
    if p.teacher_flops_per_token:
        lines.append(f"teacher forward: {p.teacher_flops_per_token / 1e9:.1f} GFLOP/token more (not counted in MFU)")
    lines += ["", f"{'stage':>5} {'layers':>6} {'weights':>9} {'grads':>9} {'optim':>9} {'act/mb':>9} {'in-flight':>9} "
                  f"{'activ.':>9}" + (f" {'others':>9}" if distill else "") + (f" {'rollout':>9}" if rollouts else "")
              + f" {'total GiB':>10}"]
    for s in p.stages:
        lines.append(f"{s.pp_rank:>5} {s.layers:>6} {s.weights_bytes / gib:>9.2f} {s.grads_bytes / gib:>9.2f} "
                     f"{s.optimizer_bytes / gib:>9.2f} {s.activation_bytes_per_microbatch / gib:>9.2f} "
                     f"{s.microbatches_in_flight:>9} {s.activations_bytes / gib:>9.2f}"
                     + (f" {s.companion_bytes / gib:>9.2f}" if distill else "")
                     + (f" {s.rollout_bytes / gib:>9.2f}" if rollouts else "") + f" {s.total_bytes / gib:>10.2f}")
    if rollouts:
        lines.append("rollout: KV cache of the rows a rank decodes + one pass's logits, between steps "
                     "(total = static + max(activ., rollout))")
    lines.append("")
    lines.append("communication per rank per step: " + ", ".join(
        f"{k} {v / 1e9:.2f} GB" for k, v in p.comm_bytes_per_step.items()))
    if p.gpu_memory_bytes is not None:
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(f"memory: peak stage {p.peak_stage.pp_rank} needs {p.peak_stage.total_bytes / gib:.1f} GiB of "
                     f"{p.gpu_memory_bytes / gib:.0f} GiB — {verdict}")
    lines += [f"note: {n}" for n in p.notes if not n.startswith("does not fit")]
    return "\n".join(lines)
