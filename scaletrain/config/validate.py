"""Cross-field rules, checked before any process group, allocation or data access (DESIGN rule 10).

`resolve` fills the derived model sizes (0 means "derive"); `validate` returns every broken rule at
once, each with what to change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

from scaletrain.config.load import ConfigError
from scaletrain.config.moe import moe_errors
from scaletrain.config.schema import ModelConfig, RunConfig
from scaletrain.config.stability import stability_errors

DTYPES = ("auto", "float32", "bfloat16", "float64")
SCHEDULES = ("cosine", "wsd", "constant")
WSD_SHAPES = ("linear", "cosine", "1-sqrt")
ROPE_SCALINGS = ("none", "llama3")
BACKENDS = ("auto", "torch", "te")
DEVICES = ("auto", "cpu", "cuda")
FAMILIES = ("llama",)
RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_MODULES = ("core_attn", "mlp_act", "norm")
PARAM_LAYOUTS = ("auto", "bf16", "fp32")
FP8_BACKENDS = ("te", "torchao")
KERNEL_NAMES = ("rmsnorm", "rope", "swiglu", "cross_entropy", "all")
# Catchable signals a scheduler can send ahead of a deadline (Slurm: --signal=USR1@90).
STOP_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP")


def padded_vocab_size(tokenizer_vocab: int, multiple: int) -> int:
    """The derived vocabulary: the tokenizer's size rounded up to a multiple of `multiple`, whatever the layout.

    Megatron pads to make-vocab-size-divisible-by × tp, so the embedding's shape — and a seeded model —
    depends on tp, and a checkpoint saved at tp2 does not load at tp1. Here the shape is a property of the
    model: the default multiple, 128, divides over every tp up to 128 that is a power of two (each shard
    then holds 128/tp·k rows: a multiple of 16 at tp8, enough for tensor-core tiles), and a tp that does
    not divide the size is refused up front (`resolve_model`, `validate`)."""
    return int(math.ceil(tokenizer_vocab / multiple) * multiple)


def resolve_model(model: ModelConfig, *, tokenizer_vocab: int | None, tp: int, seq_length: int) -> ModelConfig:
    """Replace every 0 ('derive') field of the model section by its derived value. The derived vocabulary
    does not depend on tp (`padded_vocab_size`); a tp that does not divide it is refused here, with the fix."""
    changes: dict[str, Any] = {}
    if model.vocab_size == 0:
        if tokenizer_vocab is None:
            raise ConfigError("model.vocab_size = 0 derives the size from the tokenizer; set data.tokenizer.")
        if model.vocab_multiple < 1:
            raise ConfigError(f"model.vocab_multiple = {model.vocab_multiple} must be at least 1.")
        changes["vocab_size"] = padded_vocab_size(tokenizer_vocab, model.vocab_multiple)
        if changes["vocab_size"] % tp:
            raise ConfigError(
                f"model.vocab_size = 0 derives {changes['vocab_size']} rows (the tokenizer's {tokenizer_vocab} "
                f"tokens rounded up to model.vocab_multiple = {model.vocab_multiple}), which do not split over "
                f"parallel.tp = {tp}; choose a tp that divides {changes['vocab_size']}, or start the run with "
                f"model.vocab_multiple a multiple of {tp} (e.g. {math.lcm(model.vocab_multiple, tp)}) — the size "
                "is kept for every later layout.")
    if model.num_kv_heads == 0:
        changes["num_kv_heads"] = model.num_heads
    if model.head_dim == 0 and model.num_heads > 0:
        changes["head_dim"] = model.hidden_size // model.num_heads
    if model.ffn_hidden_size == 0:
        # Llama: 2/3 of 4·hidden, rounded up to a multiple of 256.
        changes["ffn_hidden_size"] = 256 * math.ceil(int(8 * model.hidden_size / 3) / 256)
    if model.max_position_embeddings == 0:
        changes["max_position_embeddings"] = seq_length
    return dataclasses.replace(model, **changes)


def check_choice(errors: list[str], key: str, value: str, choices: tuple[str, ...]) -> None:
    """Adds "key = value is not one of …" to `errors` unless `value` is one of `choices`."""
    if value not in choices:
        errors.append(f"{key} = {value!r} is not one of {', '.join(choices)}.")


def _precision_errors(errors: list[str], cfg: RunConfig) -> None:
    """precision.params / fp8_backend / fp8_recipe and parallel.recompute_modules (issue 25's keys)."""
    pr, p = cfg.precision, cfg.parallel
    check_choice(errors, "precision.params", pr.params, PARAM_LAYOUTS)
    if pr.params == "bf16" and pr.dtype in ("float32", "float64"):
        errors.append(f"precision.params = 'bf16' keeps bf16 weights, which precision.dtype = '{pr.dtype}' does not "
                      "compute in; set precision.dtype = 'bfloat16' (or precision.params = 'auto').")
    if pr.params == "fp32" and pr.dtype == "float64":
        errors.append("precision.params = 'fp32' with precision.dtype = 'float64': float64 runs keep float64 weights; "
                      "set precision.params = 'auto'.")
    if pr.dtype == "bfloat16" and pr.params != "fp32" and cfg.optim.impl != "torch":
        errors.append(f"optim.impl = '{cfg.optim.impl}' steps bf16 weights in place, but bf16 weights keep their fp32 "
                      "master copies in scaletrain's optimizer (torch's fused AdamW on CUDA); set optim.impl = 'torch', "
                      "or precision.params = 'fp32'.")
    check_choice(errors, "precision.fp8_backend", pr.fp8_backend, FP8_BACKENDS)
    recipes = ("current", "tensorwise", "rowwise") if pr.fp8_backend == "torchao" else ("current", "delayed", "blockwise")
    check_choice(errors, "precision.fp8_recipe", pr.fp8_recipe, recipes)
    check_choice(errors, "precision.fp8_format", pr.fp8_format, ("hybrid", "e4m3"))
    if pr.fp8 and pr.fp8_backend == "torchao" and pr.fp8_format != "hybrid":
        errors.append("precision.fp8_format applies to Transformer Engine; torchao's recipes fix their own formats "
                      "(leave it 'hybrid').")
    if pr.fp8_emulate and not (pr.fp8 and pr.fp8_backend == "torchao"):
        errors.append("precision.fp8_emulate emulates torchao's FP8 matmuls; it needs precision.fp8 = true and "
                      "precision.fp8_backend = 'torchao'.")
    if not p.bucket_mb > 0:
        errors.append(f"parallel.bucket_mb = {p.bucket_mb} must be positive (MiB of gradients per dp bucket).")
    for name in p.recompute_modules:
        if name not in RECOMPUTE_MODULES:
            errors.append(f"parallel.recompute_modules: {name!r} is not one of {', '.join(RECOMPUTE_MODULES)}.")
    if p.recompute == "selective" and not p.recompute_modules:
        errors.append("parallel.recompute = 'selective' with no parallel.recompute_modules recomputes nothing; "
                      "list 'core_attn' and/or 'mlp_act', or set parallel.recompute = 'none'.")


def parse_split(split: str) -> list[float]:
    """'98,2,0' → [0.98, 0.02, 0.0]; raises ConfigError on a malformed string."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError as e:
        raise ConfigError(f"data.split = {split!r}: expected three numbers such as '98,2,0'.") from e
    while len(parts) < 3:
        parts.append(0.0)
    if len(parts) != 3 or sum(parts) <= 0 or min(parts) < 0:
        raise ConfigError(f"data.split = {split!r}: expected three non-negative numbers such as '98,2,0'.")
    return [p / sum(parts) for p in parts]


class StageRules(Protocol):
    """What validation asks of the run's training stage (scaletrain/stages/stage.py `Stage`)."""

    def config_errors(self, cfg: RunConfig) -> list[str]: ...

    def rollout_group(self, cfg: RunConfig) -> int: ...


def validate(cfg: RunConfig, world_size: int, stage: StageRules | None = None) -> int:
    """Check every cross-field rule for a resolved config at `world_size`; return dp.

    The rules of the run's stage come from `stage` (scaletrain.prepare.check_config looks it up by
    posttrain.objective); without one only the stage-independent rules are checked.
    Raises ConfigError listing all problems, each with the change that fixes it.
    """
    m, p, t, o, d = cfg.model, cfg.parallel, cfg.train, cfg.optim, cfg.data
    errors: list[str] = []
    errors += stability_errors(cfg)  # non-finite numbers, learning rates, clip values, divergence guard
    check_choice(errors, "model.family", m.family, FAMILIES)
    check_choice(errors, "precision.dtype", cfg.precision.dtype, DTYPES)
    check_choice(errors, "optim.schedule", o.schedule, SCHEDULES)
    check_choice(errors, "optim.wsd_decay_shape", o.wsd_decay_shape, WSD_SHAPES)
    check_choice(errors, "model.rope_scaling", m.rope_scaling, ROPE_SCALINGS)
    check_choice(errors, "parallel.backend", p.backend, BACKENDS)
    check_choice(errors, "train.device", t.device, DEVICES)
    check_choice(errors, "parallel.recompute", p.recompute, RECOMPUTE)
    pt = cfg.posttrain
    check_choice(errors, "posttrain.sft.loss_on", pt.sft.loss_on, ("assistant", "all"))
    check_choice(errors, "posttrain.sft.over_length", pt.sft.over_length, ("drop", "truncate"))
    check_choice(errors, "posttrain.dpo.loss_type", pt.dpo.loss_type, ("sigmoid", "ipo", "hinge", "simpo"))
    if stage is not None:
        errors += stage.config_errors(cfg)
    if pt.reward.center_coefficient < 0:
        errors.append(f"posttrain.reward.center_coefficient = {pt.reward.center_coefficient} must be 0 (off) or positive.")
    if cfg.checkpoint.export_hf and not cfg.checkpoint.save_at_end:
        errors.append("checkpoint.export_hf needs checkpoint.save_at_end = true (the export reads the final checkpoint).")
    if pt.dpo.nll_weight < 0:
        errors.append(f"posttrain.dpo.nll_weight = {pt.dpo.nll_weight} must be 0 (off) or positive.")
    if pt.dpo.beta <= 0:
        errors.append(f"posttrain.dpo.beta = {pt.dpo.beta} must be positive.")
    if not 0 <= pt.dpo.label_smoothing < 0.5:
        errors.append(f"posttrain.dpo.label_smoothing = {pt.dpo.label_smoothing} must be in [0, 0.5).")
    for name in p.kernels:
        if name not in KERNEL_NAMES:
            errors.append(f"parallel.kernels: {name!r} is not one of {', '.join(KERNEL_NAMES)}.")
    for name in t.stop_signals:
        if name not in STOP_SIGNALS:
            errors.append(f"train.stop_signals: {name!r} is not one of {', '.join(STOP_SIGNALS)} "
                          "(SIGKILL and SIGSTOP cannot be caught; SIGTERM is what launchers send to kill).")
    if p.timeout_s <= 0:
        errors.append(f"parallel.timeout_s = {p.timeout_s} must be positive (seconds a collective may wait).")

    for key, value in [
        ("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers),
        ("model.num_heads", m.num_heads), ("train.steps", t.steps),
        ("train.global_batch_size", t.global_batch_size), ("train.micro_batch_size", t.micro_batch_size),
        ("train.seq_length", t.seq_length), ("parallel.tp", p.tp), ("parallel.pp", p.pp),
        ("parallel.vpp", p.vpp), ("parallel.cp", p.cp),
    ]:
        if value < 1:
            errors.append(f"{key} = {value} must be at least 1.")
    for key, value in [
        ("train.eval_interval", t.eval_interval), ("train.exit_interval", t.exit_interval),
        ("checkpoint.interval", cfg.checkpoint.interval), ("checkpoint.keep_last", cfg.checkpoint.keep_last),
        ("optim.warmup_steps", o.warmup_steps), ("logging.interval", cfg.logging.interval),
        ("train.eval_iters", t.eval_iters),
    ]:
        if value < 0:
            errors.append(f"{key} = {value} must be 0 (off) or positive.")
    for key, value in [("model.num_kv_heads", m.num_kv_heads), ("model.head_dim", m.head_dim),
                       ("model.ffn_hidden_size", m.ffn_hidden_size), ("model.vocab_size", m.vocab_size)]:
        if value < 0:
            errors.append(f"{key} = {value} must be 0 (derive) or positive.")
    if errors:  # sizes below are meaningless with non-positive inputs
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))

    if m.hidden_size % m.num_heads and m.head_dim == 0:
        errors.append(f"model.hidden_size = {m.hidden_size} is not divisible by model.num_heads = {m.num_heads}; "
                      "change one of them or set model.head_dim.")
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        errors.append(f"model.num_heads = {m.num_heads} is not a multiple of model.num_kv_heads = "
                      f"{m.num_kv_heads} (GQA groups must be equal).")
    if m.num_heads % p.tp:
        errors.append(f"model.num_heads = {m.num_heads} is not divisible by parallel.tp = {p.tp}; choose a tp that divides it.")
    if m.num_kv_heads % p.tp:
        errors.append(f"model.num_kv_heads = {m.num_kv_heads} is not divisible by parallel.tp = {p.tp}; "
                      "choose a tp that divides the key/value heads.")
    if m.ffn_hidden_size % p.tp:
        errors.append(f"model.ffn_hidden_size = {m.ffn_hidden_size} is not divisible by parallel.tp = {p.tp}.")
    if m.vocab_size % p.tp:
        errors.append(f"model.vocab_size = {m.vocab_size} is not divisible by parallel.tp = {p.tp} (each tp rank "
                      "holds an equal share of the vocabulary); choose a tp that divides it, or for a new run "
                      "set model.vocab_size = 0 to pad the tokenizer's size to model.vocab_multiple.")
    if m.head_dim % 2:
        errors.append(f"head_dim = {m.head_dim} must be even for RoPE.")
    if m.num_layers % (p.pp * p.vpp):
        errors.append(f"model.num_layers = {m.num_layers} is not divisible by parallel.pp·parallel.vpp = "
                      f"{p.pp}·{p.vpp}; change the layer count or the pipeline layout.")
    if p.vpp > 1 and p.pp == 1:
        errors.append("parallel.vpp > 1 needs parallel.pp > 1 (virtual stages interleave a real pipeline).")
    if p.sequence_parallel and p.tp == 1:
        errors.append("parallel.sequence_parallel = true needs parallel.tp > 1.")
    if p.cp > 1:
        _context_parallel_errors(errors, cfg)
    elif p.sequence_parallel and t.seq_length % p.tp:
        errors.append(f"train.seq_length = {t.seq_length} is not divisible by parallel.tp = {p.tp} "
                      "(sequence parallelism splits the sequence over tp).")
    pr = cfg.precision
    _precision_errors(errors, cfg)
    if pr.fp8:
        if pr.dtype not in ("auto", "bfloat16"):
            errors.append(f"precision.fp8 = true runs under bf16 autocast; precision.dtype = '{pr.dtype}' cannot "
                          "be combined with it (use 'auto' or 'bfloat16').")
        if not 0 <= 2 * pr.fp8_bf16_layers < cfg.model.num_layers:
            errors.append(f"precision.fp8_bf16_layers = {pr.fp8_bf16_layers}: keeping that many first and last "
                          f"layers in bf16 leaves none of the {cfg.model.num_layers} in FP8.")
        if pr.fp8_amax_history < 1:
            errors.append(f"precision.fp8_amax_history = {pr.fp8_amax_history} must be at least 1.")
        if p.recompute != "none" and pr.fp8_backend == "te":
            errors.append("precision.fp8 with parallel.recompute: recomputation under FP8 (Transformer Engine's) needs "
                          "TE's own checkpointing, not wired yet; set parallel.recompute = 'none' (or use "
                          "precision.fp8_backend = 'torchao', which recomputes like bf16).")
    if p.backend == "te" and p.kernels:
        errors.append("parallel.kernels are the torch backend's fused kernels; Transformer Engine fuses its own "
                      "(set parallel.kernels = [] with parallel.backend = 'te').")
    if pr.fp8 and pr.fp8_backend == "te" and p.backend != "te":
        errors.append("precision.fp8 = true needs parallel.backend = 'te' (Transformer Engine on CUDA) with "
                      "precision.fp8_backend = 'te'; or set precision.fp8_backend = 'torchao' for the torch backend.")
    if pr.fp8 and pr.fp8_backend == "torchao" and p.backend != "torch":
        errors.append(f"precision.fp8_backend = 'torchao' converts the torch backend's linears; set parallel.backend = "
                      f"'torch' (it is '{p.backend}').")
    if m.max_position_embeddings and m.max_position_embeddings < t.seq_length:
        errors.append(f"train.seq_length = {t.seq_length} exceeds model.max_position_embeddings = "
                      f"{m.max_position_embeddings}; shorten the sequences or raise model.max_position_embeddings "
                      "(it also overrides an init_from_hf model's value).")
    if o.warmup_steps > t.steps:
        errors.append(f"optim.warmup_steps = {o.warmup_steps} exceeds train.steps = {t.steps}.")
    if not 0.0 <= o.decay_fraction <= 1.0:
        errors.append(f"optim.decay_fraction = {o.decay_fraction} must be within [0, 1].")
    if o.min_lr > o.lr:
        errors.append(f"optim.min_lr = {o.min_lr} exceeds optim.lr = {o.lr}.")
    if d.weights and len(d.weights) != len(d.prefixes):
        errors.append(f"data.weights has {len(d.weights)} entries for {len(d.prefixes)} data.prefixes; give one per prefix.")
    if any(w < 0 for w in d.weights) or (d.weights and sum(d.weights) <= 0):
        errors.append("data.weights must be non-negative and not all zero.")
    try:
        parse_split(d.split)
    except ConfigError as e:
        errors.append(str(e))

    model_parallel = p.tp * p.pp * p.cp
    dp = world_size // model_parallel if world_size % model_parallel == 0 else 0
    if dp == 0:
        errors.append(f"world size {world_size} is not divisible by tp·pp·cp = {p.tp}·{p.pp}·{p.cp} = "
                      f"{model_parallel}; launch a multiple of {model_parallel} processes.")
    elif t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(f"train.global_batch_size = {t.global_batch_size} is not divisible by "
                      f"train.micro_batch_size·dp = {t.micro_batch_size}·{dp}; change one of them.")
    elif p.vpp > 1 and (t.global_batch_size // (t.micro_batch_size * dp)) % p.pp:
        errors.append(f"interleaved 1F1B (parallel.vpp = {p.vpp}) needs the microbatches per step "
                      f"({t.global_batch_size // (t.micro_batch_size * dp)}) to be a multiple of parallel.pp = {p.pp}; "
                      "change train.global_batch_size or train.micro_batch_size.")
    elif stage is not None and stage.rollout_group(cfg) >= 2 and (t.global_batch_size // dp) % stage.rollout_group(cfg):
        errors.append(f"grpo: each dp rank samples whole groups, so train.global_batch_size / dp = "
                      f"{t.global_batch_size}/{dp} must be a multiple of posttrain.{cfg.posttrain.objective}.group_size = "
                      f"{stage.rollout_group(cfg)}.")
    elif cfg.posttrain.rollout.micro_batch:
        rm, per_replica = cfg.posttrain.rollout.micro_batch, t.global_batch_size // dp
        if rm < 0 or per_replica % rm or (p.vpp > 1 and (per_replica // rm) % p.pp):
            errors.append(f"posttrain.rollout.micro_batch = {rm} must divide the rows each replica samples, "
                          f"train.global_batch_size / dp = {per_replica}"
                          + (f", into a multiple of parallel.pp = {p.pp} passes (interleaved 1F1B)" if p.vpp > 1 else "")
                          + "; 0 uses train.micro_batch_size.")
    if t.eval_tasks and not t.eval_interval:
        errors.append("train.eval_tasks run at validations: set train.eval_interval (or drop the tasks).")
    errors += moe_errors(m.moe, num_layers=m.num_layers, tp=p.tp, ep=p.ep, ffn_hidden_size=m.ffn_hidden_size)
    if p.ep < 1 or (dp and (dp * p.cp) % p.ep):
        errors.append(f"parallel.ep = {p.ep} must divide dp·cp = {dp}·{p.cp} (the expert-parallel ranks are taken "
                      "from the data-parallel ones); launch more processes or lower parallel.ep.")
    samples = stage is not None and stage.rollout_group(cfg) > 0
    if p.ep > 1 and (t.eval_tasks or (samples and (p.pp > 1 or p.cp > 1))):
        # The ep ranks decode in lock step (generation/ep_lockstep.py), proven for a stage's rollouts at
        # pp = cp = 1; pipelined or cp-split decoding and the eval tasks' passes are not yet.
        errors.append(f"parallel.ep = {p.ep} with sampling ("
                      + ("train.eval_tasks" if t.eval_tasks else f"a stage's rollouts at pp = {p.pp}, cp = {p.cp}")
                      + "): expert-parallel decoding runs the ep ranks in lock step only for a stage's rollouts "
                      "without pipeline or context parallelism; set parallel.ep = 1 for this run (tp and pp still "
                      "split the model), or parallel.pp = parallel.cp = 1 without train.eval_tasks.")
    if errors:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))
    return dp


def _context_parallel_errors(errors: list[str], cfg: RunConfig) -> None:
    """cp splits each sequence into 2·cp chunks (two per rank, load-balanced under the causal mask);
    with sequence parallelism each rank's share is split again over tp."""
    p, t = cfg.parallel, cfg.train
    if t.seq_length % (2 * p.cp):
        errors.append(f"train.seq_length = {t.seq_length} is not divisible by 2·parallel.cp = {2 * p.cp} (context "
                      "parallelism gives every cp rank two of 2·cp equal chunks); change one of them.")
    elif p.sequence_parallel and (t.seq_length // p.cp) % p.tp:
        errors.append(f"train.seq_length / parallel.cp = {t.seq_length // p.cp} tokens per cp rank are not divisible "
                      f"by parallel.tp = {p.tp} (sequence parallelism splits them over tp).")

