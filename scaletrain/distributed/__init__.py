"""Environment → ranks, and the parallel layout (built once, passed explicitly)."""

from scaletrain.distributed.dims import ParallelDims
from scaletrain.distributed.env import DistEnv, read_env

__all__ = ["DistEnv", "ParallelDims", "read_env"]
