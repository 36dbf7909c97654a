#!/usr/bin/env bash
# One srun task of a scaletrain job: ignore the stop signal here (only the trainer acts on it), tee
# this task's output into its own log file, then become the command (torchrun or scaletrain).
#
#   task.sh LOG_FILE COMMAND [ARGS...]
#
# LOG_FILE and ARGS may contain @NODE@ (SLURM_NODEID), @RANK@ (SLURM_PROCID) and @ISHOST@ (1 on the
# allocation's first node, else 0), filled in here because only the task knows where it runs.
#
# Why ignore USR1/USR2: Slurm delivers `--signal` / `scancel --signal` to every process of the step.
# tee would die of it (breaking the trainer's stdout) and torchrun would tear its workers down; an
# ignored signal stays ignored across exec, while the trainer installs its own handler. tee also
# ignores TERM and INT: the trainer checkpoints on them and still writes its last lines (tee ends at
# end of input); torchrun and the trainer keep their own TERM/INT handling.
set -uo pipefail
trap '' USR1 USR2
is_host=0; [[ ${SLURM_NODEID:-0} == 0 ]] && is_host=1
sub() {
  local s=${1//@NODE@/${SLURM_NODEID:-0}}
  s=${s//@RANK@/${SLURM_PROCID:-0}}
  printf '%s' "${s//@ISHOST@/$is_host}"
}
log=$(sub "$1"); shift
args=()
for a in "$@"; do args+=("$(sub "$a")"); done
mkdir -p "$(dirname "$log")"
exec > >(trap '' TERM INT; exec tee -a "$log") 2>&1
exec "${args[@]}"
