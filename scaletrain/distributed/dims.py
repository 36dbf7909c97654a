"""ParallelDims: the frozen parallel layout of a run, built once and passed to whoever needs it.

Rank order is Megatron's: tp fastest, then cp, dp, pp — a tp group sits inside one node.
Every size degrades to 1, where no process group exists and collectives are no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.schema import ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    cp: int
    dp: int
    pp: int
    vpp: int
    rank: int = 0

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
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, rank: int) -> ParallelDims:
        """Layout for `world_size` processes; dp is inferred (the config was validated for this size)."""
        dp = world_size // (cfg.tp * cfg.pp * cfg.cp)
        return cls(tp=cfg.tp, cp=cfg.cp, dp=dp, pp=cfg.pp, vpp=cfg.vpp, rank=rank)
