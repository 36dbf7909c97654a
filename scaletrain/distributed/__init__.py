"""Environment → ranks, and the parallel layout (built once, passed explicitly)."""

from scaletrain.distributed.dims import ParallelDims
from scaletrain.distributed.env import DistEnv, read_env
from scaletrain.distributed.init import init_distributed, shutdown_distributed

__all__ = ["DistEnv", "ParallelDims", "init_distributed", "read_env", "shutdown_distributed"]
