"""Executors and tasks for scaletrain jobs on nemo-run: the same launch as slurm/*.sbatch.

Slurm: one allocation of N nodes × G GPUs; torchrun per node with c10d rendezvous on the first node
(or, with --launch-style srun, one task per GPU and ranks from SLURM_*); the cluster environment file
slurm/env/<name>.sh sourced first; `--signal=USR1@<s>` so the trainer checkpoints ahead of the time
limit; `--open-mode=append` and requeue. nemo-run's script requeues on any non-zero exit while
restarts < retries, which covers the trainer's exit 75 after a stop signal (SIGUSR1 or SIGTERM); exit 2
(bad input) and 3 (diverged) are not requeued (`_requeue_guard`), as in slurm/common.sh.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run file (TOML), e.g. configs/llama3_8b.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), passed through to scaletrain")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: torchrun on this machine; slurm: sbatch on a Slurm cluster")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= processes) per node; 0 for CPU nodes")
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="processes per node when it differs from --gpus-per-node (CPU nodes, local runs)")
    p.add_argument("--launch-style", choices=("torchrun", "srun"), default="torchrun",
                   help="torchrun: one task per node running torchrun; srun: one task per process")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="04:00:00", help="Slurm time limit (HH:MM:SS)")
    p.add_argument("--job-name", default="pretrain", help="task name (Slurm job name: scaletrain.<name>)")
    p.add_argument("--cluster-env", default="default", help="slurm/env/<name>.sh to source (default, infiniband, "
                   "roce, aws-efa, cpu)")
    p.add_argument("--signal-seconds", type=int, default=180,
                   help="USR1 this many seconds before the time limit: checkpoint and requeue")
    p.add_argument("--max-requeues", type=int, default=20)
    p.add_argument("--job-dir", default=str(REPO / "logs" / "nemo-run"),
                   help="where nemo-run keeps scripts and logs (on a filesystem the nodes share)")
    p.add_argument("--dryrun", action="store_true", help="print the sbatch script (or local command) and stop")


def procs_per_node(args: argparse.Namespace) -> int:
    return args.nproc_per_node or args.gpus_per_node or 1


def check_config(config: str, overrides: list[str], world_size: int) -> None:
    """Reject typos, layouts that do not divide and world sizes that do not fit before submitting.

    Sizes the tokenizer would derive (vocab_size = 0) are checked with a stand-in when the tokenizer
    is not on this machine; the job checks them again at start-up.
    """
    from scaletrain.commands.profile import resolved_config

    resolved_config(config, overrides, world_size, placeholder_vocab=True, require_data=True)


def build_task(stage: str, config: str, overrides: list[str], executor: str = "slurm", nproc: int = 1):
    """`python -m scaletrain.cli STAGE --config ... --set ...` as a nemo-run script."""
    import shlex
    import sys

    import nemo_run as run

    args = [stage, "--config", config]
    for item in overrides:
        args += ["--set", item]
    if executor == "local":
        # nemo-run shell-quotes every torchrun argument for its sbatch scripts, but its local scheduler
        # starts torchrun without a shell ('data.prefixes=["x"]' would arrive with its quotes on), so
        # the local job is one shell line with torchrun spelled out.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "scaletrain.cli", *args]
        return run.Script(inline=shlex.join(cmd))
    return run.Script(path="scaletrain.cli", m=True, args=args, entrypoint="python")


def _requeue_guard(job_dir: Path) -> list[str]:
    """Lines for the sbatch script: nemo-run's template runs `scontrol requeue` after any non-zero exit while
    restarts remain, but a trainer that exited 2 (bad input) or 3 (diverged) would only fail the same way
    again. Rank 0 records its exit code in a file on the shared job directory (torchrun reports any failed
    worker as 1), and a shell function in front of scontrol skips the requeue for those two codes; a stop
    signal's 75 and failures without a record (a lost node) are requeued as before."""
    status = job_dir / "exit_status.$SLURM_JOB_ID"
    return [
        f'export SCALETRAIN_EXIT_STATUS_FILE="{status}"',
        'rm -f "$SCALETRAIN_EXIT_STATUS_FILE"',
        'scontrol() { if [ "$1" = requeue ]; then local code; code=$(cat "$SCALETRAIN_EXIT_STATUS_FILE" 2>/dev/null); '
        'case "$code" in 2|3) echo "scaletrain: the trainer exited $code (2: bad input, 3: diverged), which a '
        'restart would repeat: not requeued" >&2; return 0;; esac; fi; command scontrol "$@"; }',
    ]


def build_executor(args: argparse.Namespace, env: dict[str, str] | None = None):
    """A nemo-run executor for args.executor; env is added to the job's environment."""
    import nemo_run as run

    nproc = procs_per_node(args)
    env_vars = {"PYTHONUNBUFFERED": "1", **(env or {})}
    if args.executor == "local":
        if args.nodes != 1:
            raise SystemExit("launch: --executor local runs on this machine only; use --nodes 1")
        return run.LocalExecutor(ntasks_per_node=1, env_vars=env_vars)  # torchrun is in the task itself
    env_file = REPO / "slurm" / "env" / f"{args.cluster_env}.sh"
    if not env_file.is_file():
        raise SystemExit(f"launch: --cluster-env {args.cluster_env}: {env_file} does not exist")
    setup = [f"source {env_file}", *_requeue_guard(Path(args.job_dir))]
    if args.launch_style == "torchrun":
        # Slurm signals every process of the step, torchrun included, and USR1 would kill an agent that
        # does not handle it: let torchrun catch it too, pass it on, and give the workers time to save.
        env_vars.update(PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                        PET_SHUTDOWN_TIMEOUT=str(args.signal_seconds))
    executor = run.SlurmExecutor(
        account=args.account, partition=args.partition, nodes=args.nodes, ntasks_per_node=nproc,
        gpus_per_node=args.gpus_per_node or None, time=args.time, signal=f"USR1@{args.signal_seconds}",
        open_mode="append", setup_lines="\n".join(setup), env_vars=env_vars, retries=args.max_requeues,
        # The nodes run the shared checkout itself (relative paths in run files resolve from it).
        srun_args=[f"--chdir={REPO}"], packager=run.Packager(),
        job_name_prefix="scaletrain.",
        # The experiment lives in args.job_dir (see experiment()); sbatch runs on this machine.
        tunnel=run.LocalTunnel(job_dir=str(Path(args.job_dir) / "experiments")),
    )
    executor.launcher = "torchrun" if args.launch_style == "torchrun" else None
    return executor


def experiment(args: argparse.Namespace, executor):
    """A nemo-run experiment whose files (scripts, logs) live under args.job_dir."""
    import nemo_run as run

    return run.Experiment(args.job_name, executor=executor, log_level="WARN", base_dir=args.job_dir)


def sbatch_script(experiment) -> str:
    """The sbatch script nemo-run generated for the experiment's single job (after dryrun)."""
    job = experiment.jobs[0]
    info = getattr(job, "_dryrun_info", None)
    if info is None or not hasattr(info.request, "materialize"):
        raise RuntimeError("nemo-run did not produce an sbatch request for this job")
    return info.request.materialize()
