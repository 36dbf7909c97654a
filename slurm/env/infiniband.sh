# shellcheck shell=bash
# H100/H200 clusters with InfiniBand (DGX/HGX SuperPOD-style, ConnectX-7): NCCL uses IB verbs + GPUDirect RDMA.
source "$(dirname "${BASH_SOURCE[0]}")/default.sh"
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}               # the IB adapters; check with ibv_devices
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}  # bootstrap/TCP traffic: not loopback or docker
export NCCL_IB_QPS_PER_CONNECTION=${NCCL_IB_QPS_PER_CONNECTION:-2}
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB}  # GPUDirect RDMA when GPU and NIC share a PCIe host bridge
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-${NCCL_SOCKET_IFNAME#^lo,docker}}
[[ -z $GLOO_SOCKET_IFNAME ]] && unset GLOO_SOCKET_IFNAME
