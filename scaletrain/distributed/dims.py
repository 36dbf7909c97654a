"""ParallelDims: the frozen parallel layout of a run, built once and passed to whoever needs it.

Rank order is Megatron's: tp fastest, then cp, dp, pp — a tp group sits inside one node. The
groups come from one torch DeviceMesh with axes (pp, dp, cp, tp), which also gives DTensor
placements for checkpoints. At world size 1 nothing is initialised: every Comm has size 1 and
every collective is a no-op, so one CPU process runs the same code as a large job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scaletrain.config.schema import ParallelConfig
from scaletrain.distributed.comm import Comm

MESH_AXES = ("pp", "dp", "cp", "tp")
EXPERT_MESH_AXES = ("pp", "edp", "ep", "tp")  # dp × cp = edp × ep, ep the faster (ep groups are neighbours)


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    cp: int
    dp: int
    pp: int
    vpp: int
    rank: int = 0
    mesh: Any = None  # torch DeviceMesh over MESH_AXES, None at world size 1
    comms: dict[str, Comm] = field(default_factory=dict)
    ep: int = 1  # expert parallelism: carved from dp × cp (see expert_comms)
    expert_mesh: Any = None  # DeviceMesh over EXPERT_MESH_AXES where ep > 1 (expert checkpoints' placements)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def ep_rank(self) -> int:
        return self.comm("ep").rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def comm(self, axis: str) -> Comm:
        """The communicator of one mesh axis ('tp', 'dp', 'cp', 'pp'), of the ranks that share the
        parameters ('dp_cp'), of one pipeline stage's ranks ('stage': tp × cp × dp, where FP8 amaxes are
        reduced), of expert parallelism ('ep': the ranks that split the experts; 'edp': the ranks that hold
        the same experts, over which their gradients are reduced), or 'world', 'embed', 'ckpt'; size 1 when
        trivial."""
        if axis not in self.comms:
            raise KeyError(f"no mesh axis {axis!r}; axes: {', '.join(MESH_AXES)}")
        return self.comms[axis]

    @property
    def tp_comm(self) -> Comm:
        return self.comm("tp")

    @classmethod
    def single(cls) -> ParallelDims:
        """The layout of one process: every axis of size 1, no process group (every collective a no-op)."""
        return cls.from_config(ParallelConfig(), 1, 0)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, rank: int) -> ParallelDims:
        """Layout for `world_size` processes; dp is inferred (validated beforehand).

        With world_size > 1 the default process group must already be initialised
        (`scaletrain.distributed.init.init_distributed`); every rank must call this together.
        """
        dp = world_size // (cfg.tp * cfg.pp * cfg.cp)
        sizes = {"pp": cfg.pp, "dp": dp, "cp": cfg.cp, "tp": cfg.tp}
        ranks = {"tp": rank % cfg.tp, "cp": (rank // cfg.tp) % cfg.cp,
                 "dp": (rank // (cfg.tp * cfg.cp)) % dp, "pp": rank // (cfg.tp * cfg.cp * dp)}
        mesh = None
        if world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu" if _backend_is_gloo() else "cuda", tuple(sizes[a] for a in MESH_AXES),
                                    mesh_dim_names=MESH_AXES)
        comms = {a: Comm(mesh[a].get_group() if mesh is not None and sizes[a] > 1 else None, sizes[a], ranks[a], a)
                 for a in MESH_AXES}
        comms["dp_cp"] = _dp_cp_comm(comms, sizes, ranks, world_size)
        comms["world"] = Comm(None, world_size, rank, "world")  # None: the default group
        comms["embed"] = _embedding_comm(sizes, ranks, rank, world_size)
        comms["stage"] = _stage_comm(sizes, ranks, rank, world_size)
        if world_size > 1:  # a group of its own for background checkpoint writes (never mixed with training's)
            import torch.distributed as dist

            comms["ckpt"] = Comm(dist.new_group(list(range(world_size)), backend="gloo"), world_size, rank, "ckpt")
        else:
            comms["ckpt"] = Comm.single("ckpt")
        expert_mesh = expert_comms(comms, sizes, cfg.ep, world_size)
        return cls(tp=cfg.tp, cp=cfg.cp, dp=dp, pp=cfg.pp, vpp=cfg.vpp, rank=rank, mesh=mesh, comms=comms,
                   ep=cfg.ep, expert_mesh=expert_mesh)


def expert_comms(comms: dict[str, Comm], sizes: dict[str, int], ep: int, world_size: int) -> Any:
    """Add 'ep' and 'edp' to `comms`; return the expert DeviceMesh (None where ep = 1).

    The dp × cp ranks of one (pp stage, tp rank) — index dp_rank·cp + cp_rank — split into ep groups of
    consecutive indices (each holds all experts between them) and edp groups of the same ep rank (which
    hold the same experts). At ep = 1 'ep' is trivial and 'edp' is 'dp_cp'."""
    if ep == 1:
        comms["ep"], comms["edp"] = Comm.single("ep"), comms["dp_cp"]
        return None
    from torch.distributed.device_mesh import init_device_mesh

    dp_cp = comms["dp_cp"]
    edp = dp_cp.size // ep
    mesh = init_device_mesh("cpu" if _backend_is_gloo() else "cuda", (sizes["pp"], edp, ep, sizes["tp"]),
                            mesh_dim_names=EXPERT_MESH_AXES)
    comms["ep"] = Comm(mesh["ep"].get_group(), ep, dp_cp.rank % ep, "ep")
    comms["edp"] = Comm(mesh["edp"].get_group() if edp > 1 else None, edp, dp_cp.rank // ep, "edp")
    return mesh


def _dp_cp_comm(comms: dict[str, Comm], sizes: dict[str, int], ranks: dict[str, int], world_size: int) -> Comm:
    """The ranks that hold the same parameters (same pp stage and tp slice): dp × cp. Gradients,
    the loss normaliser and ZeRO shards go over it, since cp ranks hold partial sums like dp ranks.
    Its rank is dp_rank·cp + cp_rank."""
    if sizes["cp"] == 1:
        return comms["dp"]
    if sizes["dp"] == 1:
        return comms["cp"]
    import torch.distributed as dist

    tp, cp, dp = sizes["tp"], sizes["cp"], sizes["dp"]
    mine = None
    for pp_rank in range(sizes["pp"]):  # every rank creates every group, in the same order
        for tp_rank in range(tp):
            members = [pp_rank * tp * cp * dp + d * tp * cp + c * tp + tp_rank for d in range(dp) for c in range(cp)]
            group = dist.new_group(members)
            if pp_rank == ranks["pp"] and tp_rank == ranks["tp"]:
                mine = group
    return Comm(mine, dp * cp, ranks["dp"] * cp + ranks["cp"], "dp_cp")


def _stage_comm(sizes: dict[str, int], ranks: dict[str, int], rank: int, world_size: int) -> Comm:
    """Every rank of this rank's pipeline stage (tp × cp × dp): Transformer Engine reduces FP8 amaxes over it,
    as Megatron does. The default group when pp = 1."""
    size = world_size // sizes["pp"]
    if sizes["pp"] == 1:
        return Comm(None, world_size, rank, "stage")
    import torch.distributed as dist

    mine = None
    for k in range(sizes["pp"]):  # ranks are pp-major: stage k holds [k·size, (k+1)·size); every rank creates all
        group = dist.new_group(list(range(k * size, (k + 1) * size)))
        if k == ranks["pp"]:
            mine = group
    return Comm(mine, size, rank - ranks["pp"] * size, "stage")


def _embedding_comm(sizes: dict[str, int], ranks: dict[str, int], rank: int, world_size: int) -> Comm:
    """Megatron's embedding group: the first and last pipeline rank of each (dp, cp, tp) position,
    which hold the two copies of a tied input embedding / output head."""
    if sizes["pp"] == 1:
        return Comm.single("embed")
    import torch.distributed as dist

    stride = world_size // sizes["pp"]  # ranks between consecutive pipeline stages
    mine = None
    for base in range(stride):  # every rank creates every group, in the same order
        group = dist.new_group([base, base + (sizes["pp"] - 1) * stride])
        if rank % stride == base:
            mine = group
    first_or_last = ranks["pp"] in (0, sizes["pp"] - 1)
    return Comm(mine, 2, 0 if ranks["pp"] == 0 else 1, "embed") if first_or_last else Comm.single("embed")


def _backend_is_gloo() -> bool:
    import torch.distributed as dist

    return dist.get_backend() == "gloo"
