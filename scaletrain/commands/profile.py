"""`scaletrain profile`: the analytic plan of a config and layout, or a measured run next to it.

    scaletrain profile --config configs/llama3_8b.toml --set parallel.tp=4 --gpus 32 --plan [--json F] [--png F]
    scaletrain profile --config configs/tiny.toml --steps 20 [--trace DIR]

Measured mode runs the real trainer for `--steps` steps in a scratch run directory (no checkpoints,
no validation): throughput from the steps after `--warmup`, then a few more steps with the phase
clock on for the time breakdown, then one forward under saved-tensor hooks for the activation bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from scaletrain.build import build_trainer
from scaletrain.checkpoint.locate import locate_model
from scaletrain.config import ConfigError, RunConfig, load_config, resolve_model, validate
from scaletrain.config.schema import ModelConfig
from scaletrain.data.tokenizer import load_tokenizer
from scaletrain.distributed import init_distributed, read_env, shutdown_distributed
from scaletrain.prepare import prepare
from scaletrain.profile.activations import saved_activation_bytes
from scaletrain.profile.phases import recording
from scaletrain.profile.planner import Plan, format_plan, plan
from scaletrain.runtime import device_type, process_settings
from scaletrain.stages.registry import get_stage
from scaletrain.stages.stage import Stage
from scaletrain.trainer.loop import Trainer
from scaletrain.trainer.step import prepare_batches


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run file (TOML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--plan", action="store_true", help="analytic plan only: run nothing")
    p.add_argument("--gpus", type=int, default=0, help="world size for the plan (default: tp·pp·cp, i.e. dp 1; "
                   "measured mode uses the launched world)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="device memory to check the plan against "
                   "(H100 80, H200 141)")
    p.add_argument("--json", default="", help="write the plan (and measurements) as JSON here")
    p.add_argument("--png", default="", help="write a chart of the memory breakdown per stage and the step time")
    p.add_argument("--steps", type=int, default=20, help="measured mode: steps to run")
    p.add_argument("--warmup", type=int, default=3, help="measured mode: first steps left out of the figures")
    p.add_argument("--phase-steps", type=int, default=3, help="measured mode: extra steps with the phase clock")
    p.add_argument("--trace", default="", help="measured mode: write a torch profiler trace of the phase steps here")


def resolved_config(config: str, overrides: list[str], world_size: int, *, placeholder_vocab: bool = False,
                    require_data: bool = False) -> RunConfig:
    """Load, resolve derived sizes (the vocabulary from data.tokenizer when it is on this machine) and
    validate. placeholder_vocab: where the tokenizer is absent, check the layout with a stand-in
    vocabulary (a launcher on a login node) instead of refusing. Without require_data an empty
    data.prefixes is accepted (planning a shape)."""
    cfg = load_config(config, overrides)
    stage = get_stage(cfg.posttrain.objective)
    vocab = None
    teacher = next(iter(companions(cfg, stage)[0]["teacher"]), None)
    if cfg.model.vocab_size == 0 and teacher is not None:  # a distillation student takes its teacher's (prepare.py)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=teacher.vocab_size))
    if cfg.model.vocab_size == 0:
        tok = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
        if tok is not None and tok.exists():
            vocab = load_tokenizer(str(tok)).vocab_size
        elif placeholder_vocab:
            vocab = cfg.model.vocab_multiple * cfg.parallel.tp  # only the layout is checked
        else:
            raise ConfigError("model.vocab_size = 0 derives the vocabulary from data.tokenizer, which is not on "
                              "this machine; set model.vocab_size or data.tokenizer.")
    model = resolve_model(cfg.model, tokenizer_vocab=vocab, tp=cfg.parallel.tp, seq_length=cfg.train.seq_length)
    cfg = dataclasses.replace(cfg, model=model)
    if cfg.data.prefixes or require_data:
        validate(cfg, world_size, stage)
    else:  # planning a shape without data: every rule but the data one
        validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prefixes=("planned",))), world_size, stage)
    return cfg


def companions(cfg: RunConfig, stage: Stage) -> tuple[dict, list[str]]:
    """plan()'s companion models of the run's stage — the teacher, the reference policy, reward models
    (frozen) and a critic (trained) — its rollout group, and notes for companions not on this machine."""
    teacher: list[ModelConfig] = []
    frozen = [cfg.model] if stage.reference_policy(cfg) else []
    trainable: list[ModelConfig] = []
    notes = []
    for c in stage.companions(cfg):
        if not c.path:
            continue
        try:
            m = locate_model(c.key, c.path)[2]
        except ConfigError:
            notes.append(f"{c.key} = {c.path} is not on this machine: its memory is not counted")
            continue
        if c.role == "teacher":
            teacher.append(m)
        else:  # a reward model (frozen) or a critic (trained): a score head
            (trainable if c.role == "critic" else frozen).append(dataclasses.replace(m, num_labels=1))
    return {"teacher": teacher, "frozen": tuple(frozen), "trainable": tuple(trainable),
            "rollout_group": stage.rollout_group(cfg)}, notes


def plan_run(cfg: RunConfig, world_size: int, **kw) -> tuple[Plan, list[str]]:
    """The plan of a resolved config with its stage's companions and rollouts, and notes on what it leaves out."""
    found, notes = companions(cfg, get_stage(cfg.posttrain.objective))
    teachers = found.pop("teacher")
    return plan(cfg, world_size, teacher=teachers[0] if teachers else None, **found, **kw), notes


def command(args: argparse.Namespace) -> int:
    try:
        if args.plan:
            layout = load_config(args.config, args.overrides).parallel
            world = args.gpus or layout.tp * layout.pp * layout.cp
            cfg = resolved_config(args.config, args.overrides, world)
            result, notes = plan_run(cfg, world, gpu_memory_gb=args.gpu_memory_gb)
            result.notes += notes
            print(format_plan(result))
            _write_outputs(args, result, None)
            return 0
        return _measure(args)
    except ConfigError as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        return 2


def _measure(args: argparse.Namespace) -> int:
    env = read_env()
    scratch = tempfile.mkdtemp(prefix="scaletrain-profile-")  # per rank; only rank 0 writes metrics there
    sets = [*args.overrides, f"train.steps={args.steps + args.phase_steps}", f"train.run_dir={scratch}",
            "checkpoint.interval=0", "checkpoint.save_at_end=false", "train.eval_interval=0",
            "train.exit_interval=0", "logging.tensorboard=false", "logging.wandb=false",
            f"logging.interval={max(args.steps, 1)}", "optim.warmup_steps=1"]
    cfg = load_config(args.config, sets)
    cfg, dp, tok = prepare(cfg, env.world_size)
    with process_settings():  # the run's deterministic mode and threads end with it
        owns = init_distributed(env, device_type(cfg), cfg.parallel.timeout_s)
        try:
            trainer = build_trainer(cfg, (cfg, dp, tok))
            assert trainer is not None
            # Throughput steps, then the phase-clock steps (Trainer.run stops at train.steps).
            trainer.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=args.steps))
            trainer.run()
            trainer.cfg = cfg
            trace = None
            if args.trace:
                trace = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if trainer.device.type == "cuda" else []))
                trace.__enter__()
            with recording(trainer.device) as clock:
                trainer.run()
            if trace is not None:
                trace.__exit__(None, None, None)
                Path(args.trace).mkdir(parents=True, exist_ok=True)
                trace.export_chrome_trace(str(Path(args.trace) / f"trace_rank{env.rank}.json"))
            activation = _activation_bytes(trainer)
            trainer.sinks.close()
            metrics = [json.loads(line) for line in (Path(scratch) / "metrics.jsonl").read_text().splitlines()] \
                if env.rank == 0 else []  # only rank 0 writes metrics.jsonl (its own scratch directory)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # each rank's scratch run directory: nothing in it is kept
            if owns:
                shutdown_distributed()
    if env.rank != 0:
        return 0
    steady = metrics[args.warmup:args.steps] or metrics[:args.steps]
    first = metrics[0]
    measured = {
        "world_size": env.world_size,
        "tokens_per_s_per_gpu": statistics.median(m["tokens_per_s"] for m in steady) / env.world_size,
        "tflops_per_gpu": statistics.median(m["tflops"] for m in steady),
        "mfu": statistics.median(m["mfu"] for m in steady) if steady[0].get("mfu") is not None else None,
        "step_time_s": statistics.median(m["step_time_s"] for m in steady),
        "peak_mem_gb": max(m["mem_gb"] for m in metrics),
        "weights_bytes": first.get("mem_params_bytes"), "grads_bytes": first.get("mem_grads_bytes"),
        "optimizer_bytes": first.get("mem_optimizer_bytes"),
        "activation_bytes_per_microbatch": activation,
        "phases_s_per_step": {k: v / args.phase_steps for k, v in sorted(clock.seconds.items())},
        "losses": [m["loss"] for m in metrics[:args.steps]],  # every throughput step's (variants compare)
    }
    predicted, _ = plan_run(cfg, env.world_size, gpu_memory_gb=args.gpu_memory_gb,
                            compute_dtype=trainer.precision.name if trainer.precision.autocast_dtype else
                            str(trainer.precision.param_dtype).removeprefix("torch."))
    print(format_measured(measured, predicted))
    _write_outputs(args, predicted, measured)
    return 0


def _activation_bytes(trainer: Trainer) -> int | None:
    """Bytes one microbatch's forward saves for backward on this rank (no pipeline: the whole model)."""
    if getattr(trainer.model, "pipeline_chunks", None) is not None or trainer.dims.cp > 1:
        return None  # a stage's (a cp rank's) forward needs its peers; the plan's figure stands alone there
    batch = prepare_batches(trainer.objective, next(trainer.train_batches)[:1], trainer.device, trainer.dims)[0]
    def forward_and_loss():
        output, loss_fn = trainer.objective.forward_step(batch, trainer.model)
        return loss_fn(output), output

    with trainer.precision.autocast():  # the schedule holds the output (logits) until the backward has run
        _, nbytes = saved_activation_bytes(forward_and_loss, list(trainer.model.parameters()),
                                           held=lambda result: [result[1]])
    return nbytes


def format_measured(m: dict, p: Plan) -> str:
    gib = 2**30
    stage = p.stages[0]
    rows = [
        ("weights / rank", f"{m['weights_bytes'] / gib:.4f} GiB" if m["weights_bytes"] else "—",
         f"{stage.weights_bytes / gib:.4f} GiB"),
        ("grads / rank", f"{m['grads_bytes'] / gib:.4f} GiB" if m["grads_bytes"] else "—",
         f"{stage.grads_bytes / gib:.4f} GiB"),
        ("optimizer / rank", f"{m['optimizer_bytes'] / gib:.4f} GiB" if m["optimizer_bytes"] else "—",
         f"{stage.optimizer_bytes / gib:.4f} GiB"),
        ("activations / microbatch",
         f"{m['activation_bytes_per_microbatch'] / gib:.4f} GiB" if m["activation_bytes_per_microbatch"] else "—",
         f"{stage.activation_bytes_per_microbatch / gib:.4f} GiB"),
        ("tokens/s/GPU", f"{m['tokens_per_s_per_gpu']:,.0f}", "—"),
        ("model TFLOP/s/GPU", f"{m['tflops_per_gpu']:.3f}", "—"),
        ("MFU", f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "— (no peak for this device)", "—"),
        ("step time", f"{m['step_time_s']:.4f} s", "—"),
        ("pipeline bubble", "—", f"{p.bubble_fraction:.3f}"),
        ("peak memory (process)", f"{m['peak_mem_gb']:.2f} GB", f"{p.peak_stage.total_bytes / gib:.3f} GiB"),
    ]
    lines = [f"{'':<26} {'measured':>28} {'planned':>16}"]
    lines += [f"{k:<26} {a:>28} {b:>16}" for k, a, b in rows]
    lines.append("time per step by phase (device-synchronised, nested phases overlap): " + ", ".join(
        f"{k} {v * 1e3:.1f} ms" for k, v in m["phases_s_per_step"].items()))
    return "\n".join(lines)


def _write_outputs(args: argparse.Namespace, p: Plan, measured: dict | None) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": p.to_dict(), "measured": measured}, indent=2, default=str))
    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("profile: --png needs matplotlib (pip install matplotlib); skipped", file=sys.stderr)
            return
        gib = 2**30
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        parts = [("weights", "weights_bytes"), ("grads", "grads_bytes"), ("optimizer", "optimizer_bytes"),
                 ("activations", "activations_bytes")]
        bottom = [0.0] * len(p.stages)
        for label, attr in parts:
            vals = [getattr(s, attr) / gib for s in p.stages]
            axes[0].bar([f"stage {s.pp_rank}" for s in p.stages], vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        if p.gpu_memory_bytes:
            axes[0].axhline(p.gpu_memory_bytes / gib, color="red", linestyle="--", label="device memory")
        axes[0].set_ylabel("GiB per rank")
        axes[0].set_title("memory per rank")
        axes[0].legend()
        if measured and measured.get("phases_s_per_step"):
            ph = measured["phases_s_per_step"]
            axes[1].barh(list(ph), [v * 1e3 for v in ph.values()])
            axes[1].set_xlabel("ms per step")
            axes[1].set_title("measured time by phase")
        else:
            comm = p.comm_bytes_per_step
            axes[1].bar(list(comm), [v / 1e9 for v in comm.values()])
            axes[1].set_ylabel("GB sent per rank per step")
            axes[1].set_title(f"communication (bubble {p.bubble_fraction:.2f})")
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
