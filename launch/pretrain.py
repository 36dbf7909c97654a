"""Submit (Slurm) or run (local torchrun) one scaletrain pretraining job through nemo-run.

    python -m launch.pretrain --config configs/llama3_8b.toml --set parallel.tp=8 \
        --executor slurm --nodes 4 --gpus-per-node 8 --partition batch --time 24:00:00 [--dryrun]
    python -m launch.pretrain --config configs/tiny.toml --executor local --gpus-per-node 0 --nproc-per-node 2 \
        --set parallel.tp=2
"""

from __future__ import annotations

import argparse
import sys

from launch.jobs import (
    add_job_args,
    build_executor,
    build_task,
    check_config,
    experiment,
    procs_per_node,
    sbatch_script,
)


def main(argv: list[str] | None = None, stage: str = "train") -> int:
    p = argparse.ArgumentParser(prog="python -m launch.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_args(p)
    args = p.parse_args(argv)
    try:
        check_config(args.config, args.overrides, args.nodes * procs_per_node(args))
    except Exception as e:  # ConfigError and friends: say it before anything is submitted
        print(f"launch: error: {e}", file=sys.stderr)
        return 2

    executor = build_executor(args)
    task = build_task(stage, args.config, args.overrides, args.executor, procs_per_node(args))
    with experiment(args, executor) as exp:
        exp.add(task, name=args.job_name)
        if args.dryrun:
            exp.dryrun(log=False)
            if args.executor == "slurm":
                print(sbatch_script(exp))
            else:
                print(task.inline)
            return 0
        exp.run(sequential=True, tail_logs=args.executor == "local", detach=args.executor == "slurm")
    states = [str(j.state) for j in exp.jobs]  # after the context has waited for local jobs
    print(f"launch: {args.job_name}: {', '.join(states)}")
    if args.executor == "local":
        return 0 if all(s.startswith("SUCCEEDED") for s in states) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
