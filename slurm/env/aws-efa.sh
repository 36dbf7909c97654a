# shellcheck shell=bash
# AWS p5 (H100) / p5e (H200) with EFA: NCCL through the aws-ofi-nccl plugin over libfabric.
source "$(dirname "${BASH_SOURCE[0]}")/default.sh"
export FI_PROVIDER=${FI_PROVIDER:-efa}
export FI_EFA_USE_DEVICE_RDMA=${FI_EFA_USE_DEVICE_RDMA:-1}
export FI_EFA_FORK_SAFE=${FI_EFA_FORK_SAFE:-1}       # dataloader workers fork after libfabric is loaded
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_BUFFSIZE=${NCCL_BUFFSIZE:-8388608}
