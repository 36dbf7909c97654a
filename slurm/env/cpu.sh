# shellcheck shell=bash
# CPU-only clusters and the local test cluster: gloo over TCP, one torch thread per process.
source "$(dirname "${BASH_SOURCE[0]}")/default.sh"
unset CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_DUMP_ON_TIMEOUT
