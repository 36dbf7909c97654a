"""Stage-agnostic run assembly: a prepared config → a Trainer.

    prepare (prepare.py: every input check) → runtime (device, seeds, process group, ParallelDims)
    → the stage's chat rows, rendered before any parameter exists → the policy (model_builder.py) and its
    optimizer → resumption → the stage's objective, batch source, phases and validator → Trainer

What differs per stage comes from its `Stage` (stages/registry.py); nothing here names a stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scaletrain.chat.renderer import chat_template_origin
from scaletrain.checkpoint import latest_checkpoint, load_checkpoint
from scaletrain.config import RunConfig, dump_config
from scaletrain.config.load import config_to_dict
from scaletrain.data.loader import StepBatches
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.distributed import ParallelDims, init_distributed, read_env
from scaletrain.distributed.placement import describe_placement, gather_hosts
from scaletrain.evaluation.during_training import DownstreamEval
from scaletrain.model_builder import ModelBuilder
from scaletrain.nn.backend import select_backend
from scaletrain.nn.fused import expand
from scaletrain.prepare import prepare
from scaletrain.runtime import Runtime, configure_runtime
from scaletrain.stages.registry import get_stage
from scaletrain.stages.stage import RunParts, Stage, StageParts
from scaletrain.trainer.flops import parameter_counts
from scaletrain.trainer.loop import LoopState, Trainer, set_rng_state
from scaletrain.trainer.moe_step import MOE_CONSOLE_KEYS
from scaletrain.trainer.optimizer import build_optimizer
from scaletrain.trainer.precision import resolve_precision
from scaletrain.trainer.sinks import MetricSinks
from scaletrain.trainer.stop import StopRequest
from scaletrain.trainer.validation import LossValidation


def _runtime(cfg: RunConfig) -> Runtime:
    """Device, seeds and threads; the process group (a no-op when the entry point or a harness made it);
    the layout; precision and backend."""
    env = read_env()
    backend, reason = select_backend(cfg.parallel.backend, tuple(cfg.parallel.kernels))
    device = configure_runtime(cfg)
    precision = resolve_precision(cfg.precision, device)
    init_distributed(env, device.type, cfg.parallel.timeout_s)
    dims = ParallelDims.from_config(cfg.parallel, env.world_size, env.rank)
    return Runtime(dims, precision, device, backend, reason)


def _log_run(cfg: RunConfig, stage: Stage, tokenizer: Tokenizer, rt: Runtime, log) -> None:
    env, dims, counts = read_env(), rt.dims, parameter_counts(cfg.model)
    if not stage.reads_documents(cfg):
        log(f"chat template: {chat_template_origin(cfg.posttrain, tokenizer)}")
    log(f"scaletrain: {cfg.model.family} {cfg.model.num_layers}L h{cfg.model.hidden_size} "
        f"({counts['total'] / 1e6:.2f}M params), vocab {cfg.model.vocab_size} (tokenizer {tokenizer.vocab_size}); "
        f"layout tp{dims.tp}·pp{dims.pp}·{f'cp{dims.cp}·' if dims.cp > 1 else ''}dp{dims.dp} ({env.world_size} "
        f"processes via {env.launcher}); backend {rt.backend} ({rt.backend_reason}); "
        f"precision {rt.precision.name} ({rt.precision.reason}); device {rt.device}")
    if dims.world_size > 1:
        line, warnings = describe_placement(dims, gather_hosts(dims))
        log(line)
        for w in warnings:
            log(f"warning: {w}")


def _resume(path: Path | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer, dims: ParallelDims,
            log) -> LoopState:
    if path is None:
        return LoopState(step=0, consumed_samples=0)
    trainer_state = load_checkpoint(path, model, optimizer, dims=dims)
    state = LoopState(step=int(trainer_state["step"]), consumed_samples=int(trainer_state["consumed_samples"]))
    if "rng" in trainer_state.get("rank_state", {}):
        set_rng_state(trainer_state["rank_state"]["rng"])
    log(f"resumed from {path} at step {state.step} ({state.consumed_samples} samples consumed)")
    return state


def _validator(cfg: RunConfig, parts: StageParts, model: torch.nn.Module, rt: Runtime) -> LossValidation | None:
    """The default validation: the objective's loss over the same held-out batches every time, so validation
    losses compare across steps and runs."""
    t, valid = cfg.train, parts.valid_dataset
    if valid is None or not t.eval_interval:
        return None
    dims = rt.dims

    def batches() -> StepBatches:
        return StepBatches(valid, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
                           dp_rank=dims.dp_rank, dp_size=dims.dp, num_steps=t.eval_iters)

    return LossValidation(model, parts.objective, batches, precision=rt.precision, device=rt.device, dims=dims)


def build_trainer(cfg: RunConfig, prepared: tuple[RunConfig, int, Tokenizer] | None = None, *,
                  stop: StopRequest | None = None) -> Trainer | None:
    """Check, initialise and build everything a run needs; returns a Trainer (None: nothing left to do).

    The caller owns `trainer.sinks` and must close them.
    """
    env = read_env()
    cfg, _dp, tokenizer = prepared if prepared is not None else prepare(cfg, env.world_size)
    stage = get_stage(cfg.posttrain.objective)
    run_dir = Path(cfg.train.run_dir)
    resume_from = Path(cfg.checkpoint.load) if cfg.checkpoint.load else \
        latest_checkpoint(run_dir / "checkpoints", warn=env.rank == 0)
    rt = _runtime(cfg)
    dims = rt.dims
    run_dir.mkdir(parents=True, exist_ok=True)
    if dims.is_main:
        dump_config(cfg, run_dir / "config.toml")
    log = print if dims.is_main else (lambda *a, **k: None)
    parts = RunParts(cfg, tokenizer, dims, rt.precision, rt.device, run_dir, ModelBuilder(cfg, rt, log), log,
                     fused_cross_entropy="cross_entropy" in expand(cfg.parallel.kernels),
                     resumed=resume_from is not None)
    rendered = stage.render(parts)  # chat rows rendered before any parameter exists: a bad file fails cheaply
    _log_run(cfg, stage, tokenizer, rt, log)

    model = parts.models.policy(resumed=resume_from is not None)
    optimizer = build_optimizer(model, cfg.optim, rt.device, dims)
    if cfg.parallel.kernels:
        log(f"fused kernels: {', '.join(expand(cfg.parallel.kernels))}")
    state = _resume(resume_from, model, optimizer, dims, log)
    if state.step >= cfg.train.steps:
        log(f"nothing to do: the run is at step {state.step} of train.steps = {cfg.train.steps}")
        return None
    parts.start_step = state.step
    built = stage.build(parts, model, rendered, state)

    objective, batches = built.objective, built.batches
    console = (*objective.metrics, *batches.console_keys, *(k for p in built.phases for k in p.console_keys),
               *(MOE_CONSOLE_KEYS if cfg.model.moe.num_experts else ()))
    sinks = MetricSinks(run_dir, cfg.logging, total_steps=cfg.train.steps, start_step=state.step,
                        run_config=config_to_dict(cfg), active=dims.is_main, console_keys=console)
    downstream = DownstreamEval(cfg, tokenizer, model, dims, rt.precision, rt.device) if cfg.train.eval_tasks else None
    return Trainer(cfg, model=model, optimizer=optimizer, objective=objective, train_batches=batches,
                   precision=rt.precision, device=rt.device, sinks=sinks, run_dir=run_dir, state=state, dims=dims,
                   validator=built.validator or _validator(cfg, built, model, rt), phases=built.phases,
                   downstream=downstream, stop=stop)
