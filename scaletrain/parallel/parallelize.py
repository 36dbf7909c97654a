"""parallelize(model, dims, cfg, device): the one place that turns a built model into a parallel one
(DESIGN rule 2).

Order: (1) split pipeline stages — prune the (meta-device) model to this rank's layers;
(2) materialise on the device (only what this rank runs is ever allocated); (3) bind the tp
communicator and sequence parallelism to every role layer and tag the parameters whose gradients
need a reduction (SP norm weights over tp, tied-embedding copies over the embedding group).
(4) context parallelism: bind the cp communicator to core attention; (5) fused kernels, FP8
(precision.fp8: Transformer Engine's autocast, or torchao's float8 GEMMs on the torch backend),
torch.compile per block, then activation recomputation — full around the compiled block forward,
or selective around the attention core / MLP activation inside it; (6) data parallelism and main
grads: bucketed gradient reduction hooks over dp × cp (`model.grad_buckets`), also at dp = 1 for bf16
weights, whose gradients accumulate into fp32 buckets.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from scaletrain.config.schema import ParallelConfig, PrecisionConfig
from scaletrain.distributed.dims import ParallelDims
from scaletrain.nn.attention import CoreAttention
from scaletrain.nn.backend import roles
from scaletrain.nn.float8 import apply_float8
from scaletrain.nn.fused import enable_kernels
from scaletrain.nn.init import spec_of
from scaletrain.nn.linear import TPBound
from scaletrain.nn.norm import RMSNorm
from scaletrain.parallel.data_parallel import GradBuckets
from scaletrain.parallel.expert_parallel import shard_experts
from scaletrain.parallel.pipeline.split import mark_tied_embedding, split_stages


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model on `device` (uninitialised) keeping every ParamSpec."""
    specs = {name: spec_of(p) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for module in model.modules():  # Transformer Engine finishes a meta-device module's set-up here
        if getattr(module, "te_deferred_init", False):
            module.reset_parameters()  # type: ignore[operator]  # init_method is a no-op: init_parameters fills values
    for name, p in model.named_parameters():
        p.scaletrain_spec = specs[name]  # type: ignore[attr-defined]
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if reset is not None:
            reset()


def _checkpointed(forward: Callable) -> Callable:
    """`forward` rerun in backward (its inputs kept, its internals freed); plain where no grad is taken."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # validation / generation: nothing to save
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return functools.wraps(forward)(run)


def apply_full_recompute(model: torch.nn.Module) -> None:
    """Full activation recomputation: each transformer block keeps only its input for backward and
    reruns its forward there (tensor-parallel collectives included). The block's forward is wrapped
    on the instance, so parameter names — and with them checkpoints — do not change."""
    for block in getattr(model, "layers", {}).values():
        block.forward = _checkpointed(block.forward)


def apply_selective_recompute(model: torch.nn.Module, modules: tuple[str, ...]) -> None:
    """Megatron's selective granularity (its --recompute-modules): inside every block only `modules` are
    rerun in backward — 'core_attn', the attention core with its rotary embedding (from the qkv output to
    softmax(q kᵀ) v: the rotated q and k, the s × s scores of a masked path or a fused kernel's copies and
    log-sum-exp are freed; under cp the gathered keys and values too), 'mlp_act', the MLP activation silu(gate)·up (its silu output is freed), and 'norm', the two
    RMSNorms (their float32 working copies are freed; only the bf16 input is kept). The weight GEMMs are
    never rerun. Wrapped on the instances: parameter names do not change."""
    role = roles(getattr(model, "backend", "torch"))
    blocks: list[torch.nn.Module] = list(getattr(model, "layers", {}).values())
    for block in blocks:
        regions = [m for m in block.modules() if callable(getattr(m, "attend", None))]  # rotary + core attention
        for module in block.modules():
            if "core_attn" in modules and module in regions:
                module.attend = _checkpointed(module.attend)  # type: ignore[assignment,arg-type]
            elif "core_attn" in modules and not regions and isinstance(module, role.attention):
                module.forward = _checkpointed(module.forward)
            if "norm" in modules and isinstance(module, role.norm):
                module.forward = _checkpointed(module.forward)
            if "mlp_act" in modules and callable(getattr(module, "activation", None)):
                module.activation = _checkpointed(module.activation)  # type: ignore[assignment,arg-type]


def parallelize(model: torch.nn.Module, dims: ParallelDims, cfg: ParallelConfig,
                device: torch.device | None = None, *, shard_optimizer: bool = False,
                precision: PrecisionConfig | None = None, log: Callable[[str], None] | None = None) -> torch.nn.Module:
    """Apply the parallel layout in place and return the model. Order: pipeline split, expert sharding
    (MoE: this ep rank's experts), materialise, bind tp/SP, bind cp, tied-embedding tags, kernels, FP8
    (`precision`, when precision.fp8), compile, activation recomputation, data-parallel gradient buckets
    (routed experts under ep > 1 in buckets of their own over the expert-data-parallel group). `log`
    receives what was chosen (FP8).

    With pp > 1 the model is pruned to this rank's stage and `model.pipeline_chunks` lists its
    virtual stages for the schedule. Under sequence parallelism each tp rank normalises a
    different slice of the sequence, so RMSNorm weights (replicated over tp) get partial gradients:
    they are tagged `sequence_parallel_grad` and summed over tp by `finalize_grads`; so are the weights of
    norms a tp rank applies to its own heads only (`tp_partial_grad`, Qwen3's q/k norms), at any tp > 1.
    """
    device = device or torch.device("cpu")
    sp = cfg.sequence_parallel and dims.tp > 1
    if dims.pp > 1:
        model.pipeline_chunks = split_stages(model, dims, sp)  # type: ignore[assignment]
    shard_experts(model, dims.comm("ep"))  # MoE layers: this ep rank's experts only; the ep group bound
    if any(p.is_meta for p in model.parameters()):
        materialize(model, device)
    for module in model.modules():
        if isinstance(module, TPBound) or getattr(module, "binds_tp", False):  # torch or te role layers
            module.bind_tp(dims.tp_comm, sp)  # type: ignore[operator]
        if sp and (isinstance(module, RMSNorm) or getattr(module, "role", None) == "norm"):
            module.weight.sequence_parallel_grad = True  # type: ignore[union-attr]
        if dims.tp > 1 and getattr(module, "tp_partial_grad", False):  # per-head norms (Qwen3's q/k norms)
            module.weight.sequence_parallel_grad = True  # type: ignore[union-attr]
    if dims.cp > 1:  # attention gathers keys/values over cp (torch backend; te + cp is refused up front)

        for module in model.modules():
            if isinstance(module, CoreAttention):
                module.bind_cp(dims.comm("cp"))
    mark_tied_embedding(model, dims)
    if cfg.kernels:
        enable_kernels(model, cfg.kernels)
    compile_now = cfg.compile
    if precision is not None and precision.fp8:
        line, needs_compile = _apply_fp8(model, dims, precision, device)
        compile_now = compile_now or needs_compile
        if log is not None:
            log(line)
    if compile_now:
        compile_blocks(model)
    if cfg.recompute == "full":
        apply_full_recompute(model)
    elif cfg.recompute == "selective":
        apply_selective_recompute(model, tuple(cfg.recompute_modules))
    trainable = [p for p in model.parameters() if p.requires_grad]
    low_precision = any(torch.promote_types(p.dtype, torch.float32) != p.dtype for p in trainable)
    if trainable and (dims.dp * dims.cp > 1 or low_precision):
        # Over dp × cp: cp ranks hold partial gradients too. ZeRO-1 reduce-scatters instead of all-reducing.
        # bf16 weights: their gradients accumulate into the buckets' fp32 main grads, also at dp = 1.
        # Routed experts under ep > 1: over the expert-data-parallel group instead (their own buckets).
        model.grad_buckets = GradBuckets(model, dims.comm("dp_cp"), int(cfg.bucket_mb * 2**20),  # type: ignore[assignment]
                                         shard=shard_optimizer, overlap_grad_reduce=cfg.overlap_grad_reduce,
                                         overlap_param_gather=cfg.overlap_param_gather,
                                         expert_comm=dims.comm("edp") if dims.ep > 1 else None)
    return model


def _apply_fp8(model: torch.nn.Module, dims: ParallelDims, precision: PrecisionConfig,
               device: torch.device) -> tuple[str, bool]:
    """precision.fp8 by its backend; returns (a line for the log, whether the blocks must be compiled)."""
    if precision.fp8_backend == "torchao":
        line = apply_float8(model, precision, device)
        # torchao's casts and scales are separate kernels in eager mode; inductor fuses them into the GEMMs'
        # neighbours, which is where FP8 pays on a GPU (torchtitan compiles for the same reason).
        needs_compile = device.type == "cuda"
        return line + ("; blocks compiled (torch.compile) for the fused casts" if needs_compile else ""), needs_compile
    return _enable_te_fp8(model, dims, precision), False


def _enable_te_fp8(model: torch.nn.Module, dims: ParallelDims, precision_cfg: PrecisionConfig) -> str:
    """precision.fp8 on the te backend: the model forward enters TE's FP8 autocast (amax reduced over
    this pipeline stage's ranks, dims.comm('stage'), as Megatron does), and the first / last
    precision.fp8_bf16_layers blocks (global indices) stay in bf16."""
    from scaletrain.nn import te_backend

    stage = dims.comm("stage")
    group = stage.group if stage.size > 1 else None
    model.fp8_context = te_backend.fp8_context(precision_cfg, group)  # type: ignore[assignment,operator]
    n = precision_cfg.fp8_bf16_layers
    total: int = model.cfg.num_layers  # type: ignore[union-attr,assignment]
    kept = []
    for key, block in model.layers.items():  # type: ignore[union-attr,operator]
        if int(key) < n or int(key) >= total - n:
            block.precision_override = te_backend.fp8_disabled
            kept.append(key)
    return (f"fp8: recipe {precision_cfg.fp8_recipe} ({precision_cfg.fp8_format}), amax over {stage.size} "
            f"rank(s) per stage; bf16 blocks here: {', '.join(kept) or 'none'}")


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each transformer block's forward in place, torchtitan's granularity. The bound
    forward is compiled, not the module wrapped, so parameter names (checkpoints, HF maps) do not
    change; blocks of one shape share the compiled code. The tp / SP / cp collectives inside a
    block are traced as functional collectives (distributed/comm.py), so a block is one graph, its
    communication included (inductor can then overlap and fuse around it). Compiled before
    recomputation, which then checkpoints the compiled forward: a graph break inside a checkpoint
    that dynamo traces drops the whole block back to eager, so this order stays safe if a layout
    ever breaks the graph. Passes whose shapes change every call (decoding, evaluation rows) run
    eager (`eager`)."""
    for block in getattr(model, "layers", {}).values():
        block.forward = torch.compile(block.forward)


def eager():
    """Inside this context the compiled blocks run eager: for passes whose shapes change every call (a new
    token per decoding step, evaluation rows of any width), which would otherwise recompile."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process: no stance to set (and
        return nullcontext()               # setting one imports dynamo, ~2 s before a chat's first token)
    return torch.compiler.set_stance("force_eager")


def sp_bound(model: torch.nn.Module) -> bool:
    """Whether any of the model's torch-backend tp layers runs sequence parallelism."""
    return any(isinstance(m, TPBound) and m.sequence_parallel for m in model.modules())


def _sp_holders(model: torch.nn.Module) -> list:
    """What carries the SP flag: the torch-backend tp layers and the pipeline chunks (activation shapes)."""
    layers = [m for m in model.modules() if isinstance(m, TPBound) and m.sequence_parallel]
    chunks = [c for c in getattr(model, "pipeline_chunks", None) or [] if c.sequence_parallel]
    return layers + chunks if layers else []


@contextmanager
def sp_unbound(*models: torch.nn.Module) -> Iterator[None]:
    """Within the block the models' torch-backend tp layers run plain tensor parallelism — activations
    replicated over tp, row-parallel outputs all-reduced — instead of sequence parallelism: the same
    values, for passes whose sequence cannot be split over tp (decoding one token at a time with a KV
    cache). A scoped lift of parallelize's binding, restored on exit, errors included; forward only
    (SP's norm-gradient tags assume the split)."""
    bound = [holder for model in models for holder in _sp_holders(model)]
    for m in bound:
        m.sequence_parallel = False
    try:
        yield
    finally:
        for m in bound:
            m.sequence_parallel = True
