# shellcheck shell=bash
# Defaults for any cluster (sourced by slurm/common.sh before the job step starts).
export PYTHONUNBUFFERED=1            # log lines appear as they happen, also through tee
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # torch threads are set per run (train.threads)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Report a hung NCCL collective as an error (and dump its trace) instead of blocking forever; the
# timeout itself is parallel.timeout_s.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
# One hardware queue per device keeps tensor-parallel communication ordered with compute (needed
# for overlapping TP collectives with GEMMs, as in Megatron).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
