"""`scaletrain train` / `python -m scaletrain.train`, and one command per registered stage (`scaletrain sft`,
`dpo`, …: the same with posttrain.objective set): parse → prepare → init → build → run → export.

Everything that can be wrong with the inputs is checked (scaletrain/prepare.py) before torch allocates a
parameter or megatron.core is imported. Exit codes: 0 done, 2 bad input, 3 diverged, 75 stopped for
requeue (checkpointed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scaletrain.build import build_trainer
from scaletrain.checkpoint import CheckpointError
from scaletrain.config import ConfigError, RunConfig, load_config
from scaletrain.data.indexed import DatasetError
from scaletrain.distributed import init_distributed, read_env, shutdown_distributed
from scaletrain.export import export_to_hf
from scaletrain.prepare import prepare
from scaletrain.runtime import device_type, process_settings
from scaletrain.stages.registry import stages
from scaletrain.trainer.divergence import EXIT_DIVERGED, DivergenceError
from scaletrain.trainer.stop import EXIT_INTERRUPTED, StopRequest, exit_code

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run file (TOML), e.g. configs/tiny.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set parallel.tp=2 (repeatable)")


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    """`train`, and a command per registered stage that has one (its help text from the stage)."""
    train = sub.add_parser("train", help="pretrain from a run file")
    add_train_args(train)
    train.set_defaults(func=train_command)
    for stage in stages():
        if not stage.help:
            continue
        p = sub.add_parser(stage.name, help=stage.help)
        add_train_args(p)
        p.set_defaults(func=lambda a, name=stage.name: train_command(a, objective=name))


def run(cfg: RunConfig) -> str:
    """Train according to a loaded config; returns 'done', 'exit' (exit interval), 'stopped' (a stop
    signal: checkpointed, to be requeued) or 'interrupted' (SIGINT: checkpointed)."""
    env = read_env()
    prepared = prepare(cfg, env.world_size)  # every input check happens before any process group exists
    # Installed before any slow start-up work, so that a signal then is honoured at the first step boundary.
    stop = StopRequest(cfg.train.stop_signals, rank=env.rank)
    try:
        with process_settings():  # deterministic mode and threads end with the run
            owns_group = init_distributed(env, device_type(cfg), cfg.parallel.timeout_s)
            try:
                trainer = build_trainer(cfg, prepared, stop=stop)
                result = "done"  # None: the run had already finished (an export may still be missing)
                if trainer is not None:
                    try:
                        result = trainer.run()
                    finally:
                        trainer.sinks.close()
            finally:
                if owns_group:
                    shutdown_distributed()
    finally:
        stop.close()
    if result == "done" and cfg.checkpoint.export_hf and env.rank == 0:
        export_final(cfg)
    return result


def export_final(cfg: RunConfig) -> Path:
    """checkpoint.export_hf: the final checkpoint → a Hugging Face directory, on rank 0 after the process
    group is gone (no peer waits on it; the full model is assembled in CPU memory, as `convert to-hf`)."""
    run_dir = Path(cfg.train.run_dir)
    out = Path(cfg.checkpoint.export_hf)
    out = out if out.is_absolute() else run_dir / out
    export_to_hf(run_dir / "checkpoints", out)
    print(f"exported the final checkpoint to Hugging Face format: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaletrain train", description="Pretrain a model from a run file.")
    add_train_args(parser)
    args = parser.parse_args(argv)
    return train_command(args)


def write_exit_status(code: int) -> None:
    """Rank 0 records its exit code in $SCALETRAIN_EXIT_STATUS_FILE when a launch script asks for it:
    torchrun reports any failing worker as exit 1, so the requeue code would otherwise be lost."""
    path = os.environ.get("SCALETRAIN_EXIT_STATUS_FILE")
    if path and read_env().rank == 0:
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(f"{code}\n")
        os.replace(tmp, path)


def train_command(args: argparse.Namespace, objective: str | None = None) -> int:
    """`scaletrain train` (objective from the config) or a stage command (`scaletrain sft`)."""
    try:
        overrides = list(args.overrides) + ([f"posttrain.objective={objective}"] if objective else [])
        cfg = load_config(args.config, overrides)
        outcome = run(cfg)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        write_exit_status(EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except DivergenceError as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        write_exit_status(EXIT_DIVERGED)
        return EXIT_DIVERGED
    except KeyboardInterrupt:  # a second Ctrl-C (or one before the handler was installed)
        print("scaletrain: interrupted: stopped at once, without a checkpoint", file=sys.stderr)
        write_exit_status(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    code = exit_code(outcome)
    write_exit_status(code)
    return code
