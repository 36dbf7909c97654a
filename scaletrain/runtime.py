"""The runtime a run sets up before it builds anything: device, threads, determinism, seeds, the
process group and the ParallelDims of the launch. Shared by training (scaletrain/build.py) and by the
commands that only run frozen models (eval, generate, rlaif)."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from scaletrain.config.load import ConfigError
from scaletrain.config.schema import RunConfig
from scaletrain.distributed import ParallelDims, init_distributed, read_env, shutdown_distributed
from scaletrain.nn.backend import select_backend
from scaletrain.trainer.precision import Precision, resolve_precision


def device_type(cfg: RunConfig) -> str:
    """'cuda' or 'cpu', by train.device ('auto': cuda where one is visible)."""
    return "cuda" if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu"


@contextlib.contextmanager
def process_settings() -> Iterator[None]:
    """Restores the process-wide settings configure_runtime changes (deterministic algorithms, the thread
    count, cuBLAS' workspace variable) when a command returns: a run started in-process (a notebook, a
    test, a sweep calling `scaletrain.train.main`) must not leave its caller in deterministic mode."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def configure_runtime(cfg: RunConfig) -> torch.device:
    """Threads, deterministic algorithms and every RNG's seed from train.*; returns this rank's device."""
    t = cfg.train
    threads = t.threads or (1 if t.deterministic else 0)
    if threads:
        torch.set_num_threads(threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    torch.manual_seed(t.seed)
    if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'.")
        return torch.device("cuda", read_env().local_rank)
    return torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """A run's layout and runtime: dims, precision, device and the chosen backend (with its reason)."""

    dims: ParallelDims
    precision: Precision
    device: torch.device
    backend: str
    backend_reason: str = ""


@contextlib.contextmanager
def frozen_runtime(cfg: RunConfig) -> Iterator[Runtime]:
    """The runtime of a command that only runs frozen models (eval, generate, rlaif): the run's runtime
    settings (threads, seed, device), the process group for the launch (torn down on exit if this call
    created it) and the layout of cfg.parallel."""
    env = read_env()
    with process_settings():
        device = configure_runtime(cfg)
        owns = init_distributed(env, device_type(cfg), cfg.parallel.timeout_s)
        try:
            dims = ParallelDims.from_config(cfg.parallel, env.world_size, env.rank)
            backend, reason = select_backend(cfg.parallel.backend, ())
            yield Runtime(dims, resolve_precision(cfg.precision, device), device, backend, reason)
        finally:
            if owns:
                shutdown_distributed()
