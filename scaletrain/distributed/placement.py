"""Which node each rank runs on, and whether each parallel group stays inside a node.

Tensor parallelism exchanges activations several times per layer and must stay on NVLink: a tp
group that spans nodes is usually a launch mistake (ranks not contiguous per node), so it is
reported at start-up next to where every other axis lands.
"""

from __future__ import annotations

import socket

from scaletrain.distributed.dims import MESH_AXES, ParallelDims


def gather_hosts(dims: ParallelDims) -> list[str]:
    """Hostname of every global rank (collective over the world; at size 1 just this host)."""
    return [str(h) for h in dims.comm("world").all_gather_object(socket.gethostname())]


def describe_placement(dims: ParallelDims, hosts: list[str]) -> tuple[str, list[str]]:
    """One line on node count and where each non-trivial axis lands, plus warnings (tp across nodes)."""
    nodes = sorted(set(hosts))
    parts, warnings = [f"{len(nodes)} node(s) × {len(hosts) // max(len(nodes), 1)} rank(s)"], []
    for axis in MESH_AXES:
        comm = dims.comm(axis)
        if comm.size == 1:
            continue
        members = comm.global_ranks()
        spans = len({hosts[r] for r in members})
        where = "within a node" if spans == 1 else f"across {spans} nodes"
        parts.append(f"{axis}{comm.size} {where}")
        if axis == "tp" and spans > 1:
            warnings.append(f"the tp group of ranks {members} spans {spans} nodes: tensor-parallel traffic will "
                            "cross the network; make tp ≤ GPUs per node and launch ranks contiguously per node")
    return "placement: " + ", ".join(parts), warnings
