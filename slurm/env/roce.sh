# shellcheck shell=bash
# RoCE v2 (RDMA over Ethernet) clusters: like InfiniBand, plus the GID index of the RoCE v2 address.
source "$(dirname "${BASH_SOURCE[0]}")/infiniband.sh"
export NCCL_IB_GID_INDEX=${NCCL_IB_GID_INDEX:-3}     # RoCE v2 IPv4 GID on most Mellanox setups (show_gids)
export NCCL_IB_TC=${NCCL_IB_TC:-106}                 # traffic class of the lossless (PFC) queue
