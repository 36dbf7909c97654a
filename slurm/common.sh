# shellcheck shell=bash
# Sourced by slurm/*.sbatch. Turns the allocation into one srun step running `scaletrain SUBCOMMAND`,
# then requeues the job when the trainer stopped on a signal (exit code 75; a diverged run exits 3 and is
# not requeued). No hyperparameters here: the run file and --set overrides are the script's arguments.
#
# Knobs (environment variables, all optional):
#   SCALETRAIN_LAUNCH=torchrun|srun   torchrun: one task per node running torchrun (c10d rendezvous on
#                                     the first node); srun: one task per GPU, ranks from SLURM_*
#   SCALETRAIN_NPROC_PER_NODE         processes per node (default: GPUs on the node, else tasks per node)
#   SCALETRAIN_CLUSTER_ENV=NAME       source slurm/env/NAME.sh (default: default)
#   SCALETRAIN_LOG_DIR                per-job logs (default: $SLURM_SUBMIT_DIR/logs)
#   SCALETRAIN_MAX_REQUEUES           stop requeueing after this many restarts (default 20)
#   SCALETRAIN_MASTER_PORT            rendezvous port (default 20000 + job id mod 20000)
#   SCALETRAIN_PYTHON                 python that has scaletrain installed (default: python3 on PATH)
#   SCALETRAIN_DRYRUN=1               print the srun command instead of running it
set -uo pipefail

EXIT_REQUEUE=75
ROOT=${SCALETRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $ROOT/slurm/task.sh ]]; then
  echo "scaletrain: $ROOT is not a scaletrain checkout (no slurm/task.sh); submit from the checkout or" \
       "export SCALETRAIN_ROOT=/path/to/scaletrain" >&2
  exit 2
fi
cd "$ROOT"

CLUSTER_ENV=${SCALETRAIN_CLUSTER_ENV:-default}
if [[ ! -f slurm/env/$CLUSTER_ENV.sh ]]; then
  echo "scaletrain: SCALETRAIN_CLUSTER_ENV=$CLUSTER_ENV but slurm/env/$CLUSTER_ENV.sh does not exist;" \
       "choose one of: $(cd slurm/env && ls *.sh | sed 's/\.sh$//' | tr '\n' ' ')" >&2
  exit 2
fi
# shellcheck source=/dev/null
source "slurm/env/$CLUSTER_ENV.sh"

scaletrain_launch() {  # scaletrain_launch SUBCOMMAND [ARGS...]
  local sub=$1; shift
  local style=${SCALETRAIN_LAUNCH:-torchrun}
  local job=${SLURM_JOB_ID:?not inside a Slurm allocation (submit with sbatch)}
  local attempt=${SLURM_RESTART_COUNT:-0}
  local nnodes=${SLURM_NNODES:-1}
  local log_dir=${SCALETRAIN_LOG_DIR:-$ROOT/logs}/${SLURM_JOB_NAME:-scaletrain}-$job
  local python=${SCALETRAIN_PYTHON:-python3}
  mkdir -p "$log_dir"
  export SCALETRAIN_EXIT_STATUS_FILE=$log_dir/exit-status.$attempt
  rm -f "$SCALETRAIN_EXIT_STATUS_FILE"

  local head port
  head=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n1)
  port=${SCALETRAIN_MASTER_PORT:-$((20000 + job % 20000))}
  local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
  gpus=${gpus##*:}  # --gpus-per-node=h100:8 → 8
  local nproc=${SCALETRAIN_NPROC_PER_NODE:-${gpus:-${SLURM_NTASKS_PER_NODE:-1}}}

  local cmd
  case $style in
    torchrun)
      # One task per node; c10d rendezvous hosted on the first node. is_host is set on node 0 only, so
      # the right agent hosts the store even where nodes share a hostname (containers).
      cmd=(srun --kill-on-bad-exit=1 --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1
           --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"
           slurm/task.sh "$log_dir/attempt$attempt/node-@NODE@.log"
           "$python" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$nproc"
           --rdzv-backend=c10d --rdzv-endpoint="$head:$port" --rdzv-id="$job"
           --rdzv-conf="is_host=@ISHOST@" --max-restarts=0
           --log-dir="$log_dir/attempt$attempt/torchrun-node@NODE@" --redirects=3 --tee=3
           -m scaletrain.cli "$sub" "$@")
      ;;
    srun)
      # One task per process; the trainer reads its rank from SLURM_PROCID/SLURM_NTASKS.
      export MASTER_ADDR=$head MASTER_PORT=$port
      cmd=(srun --kill-on-bad-exit=1 --nodes="$nnodes" --ntasks=$((nnodes * nproc)) --ntasks-per-node="$nproc"
           slurm/task.sh "$log_dir/attempt$attempt/rank-@RANK@.log"
           "$python" -m scaletrain.cli "$sub" "$@")
      ;;
    *) echo "scaletrain: SCALETRAIN_LAUNCH=$style is not one of torchrun, srun" >&2; return 2 ;;
  esac
  echo "scaletrain: job $job attempt $attempt: $style on $nnodes node(s) × $nproc process(es), rendezvous $head:$port, env slurm/env/$CLUSTER_ENV.sh, logs $log_dir"
  if [[ ${SCALETRAIN_DRYRUN:-0} == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; return 0; fi

  # Run the step in the background so that a signal to this batch shell (--signal=B:USR1@N) can be
  # forwarded: srun passes USR1 on to every task. TERM (scancel, the time limit, preemption) reaches
  # every task from Slurm itself, and the trainer checkpoints on it: the shell only goes on waiting, so
  # that the job lives while the step saves (Slurm's KillWait bounds it).
  local srun_pid rc terminated=0
  trap 'echo "scaletrain: batch shell received USR1, forwarding to the job step"; kill -USR1 "$srun_pid" 2>/dev/null' USR1
  trap 'terminated=1; echo "scaletrain: batch shell received TERM (scancel, time limit or preemption); waiting for the job step to checkpoint"' TERM
  "${cmd[@]}" &
  srun_pid=$!
  while true; do
    wait "$srun_pid"; rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # wait returned because of a trapped signal: wait again
  done
  trap - USR1 TERM

  local status=""
  [[ -f $SCALETRAIN_EXIT_STATUS_FILE ]] && status=$(cat "$SCALETRAIN_EXIT_STATUS_FILE")
  echo "scaletrain: step exited with code $rc (trainer reported: ${status:-nothing})"
  # torchrun reports any failed worker as 1, so the trainer's own record of 75 counts too.
  if [[ $rc == "$EXIT_REQUEUE" || ( $rc != 0 && $status == "$EXIT_REQUEUE" ) ]]; then
    if (( terminated )); then  # Slurm is ending the job; with --requeue it requeues a preempted job itself
      echo "scaletrain: checkpoint saved on TERM; Slurm is ending this job, so it is not requeued from here" \
           "(resubmit to resume from latest)"
      return "$EXIT_REQUEUE"
    fi
    if (( attempt >= ${SCALETRAIN_MAX_REQUEUES:-20} )); then
      echo "scaletrain: stopped for requeue but SCALETRAIN_MAX_REQUEUES=${SCALETRAIN_MAX_REQUEUES:-20} reached" >&2
      return 1
    fi
    echo "scaletrain: checkpoint saved on a stop signal; requeueing job $job (it resumes from latest)"
    scontrol requeue "$job"
    return 0
  fi
  return "$rc"
}
