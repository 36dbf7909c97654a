"""Refuse, before anything is allocated, a run the planner says cannot fit in this machine's memory.

A `train.seq_length` (or batch, or model) far beyond the machine otherwise ends in the kernel's OOM
killer (exit 137, no message, possibly after minutes of set-up) or a CUDA OOM deep in the first
step. The analytic planner (profile/planner.py) gives the per-rank peak without running anything;
it leaves out the framework's own overhead, allocator slack and companion models, so it is a lower
bound, and a run is refused only when even that exceeds the memory by a clear margin.

Memory compared against: CUDA — the device's total memory; CPU — the RAM available now
(MemAvailable, capped by a cgroup limit), per process (ranks sharing a host are not summed).
`train.memory_check = false` skips the check.
"""

from __future__ import annotations

from pathlib import Path

from scaletrain.config.schema import RunConfig
from scaletrain.profile.planner import plan

MARGIN = 1.25  # refuse when the estimate exceeds the memory by more than this factor
_GIB = 2**30


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1); None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 reports "no limit" as a huge number
            return max(int(limit) - usage, 0)
    return None


def available_memory(device_type: str, local_rank: int = 0) -> tuple[int, str] | None:
    """(bytes, what they are) this process can use on `device_type`; None where unknown."""
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            return None  # the runtime set-up reports this with its own message
        props = torch.cuda.get_device_properties(local_rank)
        return props.total_memory, f"the memory of GPU {local_rank} ({props.name})"
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        have = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    cgroup = _cgroup_free()
    return (min(have, cgroup) if cgroup is not None else have), "the RAM available now"


def memory_problem(cfg: RunConfig, world_size: int, device_type: str, local_rank: int = 0, *,
                   rollout_group: int = 0) -> str | None:
    """Why `cfg` cannot fit (the estimate, the memory and what to change), or None."""
    if not cfg.train.memory_check:
        return None
    available = available_memory(device_type, local_rank)
    if available is None:
        return None
    have, what = available
    # CPU autocast is off under 'auto': matmul inputs are saved in float32, not the planner's CUDA bf16.
    compute = "float32" if device_type == "cpu" and cfg.precision.dtype == "auto" else None
    stage = plan(cfg, world_size, compute_dtype=compute, rollout_group=rollout_group).peak_stage
    need = stage.total_bytes
    if need <= MARGIN * have:
        return None
    static = stage.weights_bytes + stage.grads_bytes + stage.optimizer_bytes + stage.companion_bytes
    return (f"this run needs at least {need / _GIB:,.1f} GiB per rank by the planner's estimate (pipeline stage "
            f"{stage.pp_rank}: {static / _GIB:,.1f} GiB weights, gradients and optimizer state, "
            f"{max(stage.activations_bytes, stage.rollout_bytes) / _GIB:,.1f} GiB activations at train.seq_length = "
            f"{cfg.train.seq_length}, train.micro_batch_size = {cfg.train.micro_batch_size}), but {what} is "
            f"{have / _GIB:,.1f} GiB. Shorten train.seq_length or train.micro_batch_size, set parallel.recompute = "
            "'selective' or 'full', use optim.distributed = true (ZeRO-1) with dp > 1, or spread the model (parallel.tp, pp, cp); `scaletrain profile --plan` shows the breakdown. "
            "Set train.memory_check = false to start anyway.")
