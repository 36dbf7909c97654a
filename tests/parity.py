"""Shared pieces of the parity tests: a recorded training run and reassembly of sharded results."""

from __future__ import annotations

import torch

from scaletrain.config.schema import OptimConfig
from scaletrain.nn import spec_of
from scaletrain.stages.pretrain.objective import LanguageModelingObjective
from scaletrain.trainer.optimizer import build_optimizer
from scaletrain.trainer.precision import Precision
from scaletrain.trainer.step import train_step


@torch.no_grad()
def randomise_qkv_bias(model: torch.nn.Module, tp: int, tp_rank: int) -> None:
    """Biases initialise to zero; give the qkv bias layout-independent values so its sharding is exercised."""
    for name, p in model.named_parameters():
        if name.endswith("qkv.bias"):
            p.copy_(torch.linspace(-0.1, 0.1, spec_of(p).global_shape[0], dtype=p.dtype).chunk(tp)[tp_rank])


def train_and_record(model: torch.nn.Module, dims, steps: list[list[dict]], dtype: torch.dtype,
                     optimizer=None) -> dict:
    """Run train_step over `steps` (this rank's microbatches per step, AdamW lr 1e-2, clipping at 0.5 so
    the global norm matters) and return losses, norms, step-1 gradients and final parameters (local)."""
    if optimizer is None:
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"), dims)
    objective = LanguageModelingObjective(dims.tp_comm)
    precision = Precision(dtype, None, "cpu", "test")
    out: dict = {"losses": [], "norms": [], "pp_rank": dims.pp_rank, "dp_rank": dims.dp_rank}
    for i, mbs in enumerate(steps):
        r = train_step(model, optimizer, objective, mbs, lr=1e-2, clip_grad=0.5, precision=precision,
                       device=torch.device("cpu"), dims=dims)
        out["losses"].append(r.loss)
        out["norms"].append(r.grad_norm)
        if i == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    buckets = getattr(model, "grad_buckets", None)
    if buckets is not None:  # ZeRO-1 gathers the last update under the next forward: complete it to read
        buckets.wait_params()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["shard_dims"] = {n: spec_of(p).shard_dim for n, p in model.named_parameters()}
    return out


def assemble(ranks: list[dict], key: str, tp: int) -> dict[str, torch.Tensor]:
    """Full tensors from one replica's ranks: tp shards concatenated, pipeline copies (tied embedding) equal."""
    full: dict[str, torch.Tensor] = {}
    for stage in sorted({r["pp_rank"] for r in ranks}):
        group = [r for r in ranks if r["pp_rank"] == stage]  # tp ranks of this stage, in tp order
        for name in group[0][key]:
            d = group[0]["shard_dims"][name]
            t = group[0][key][name] if d is None or tp == 1 else torch.cat([g[key][name] for g in group], dim=d)
            if name in full:  # the tied embedding's second copy must match the first exactly
                assert torch.equal(full[name], t), name
            full[name] = t
    return full


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def assert_matches(ranks: list[dict], ref: dict, tp: int, tol: float, dp: int = 1,
                   keys: tuple[str, ...] = ("grads", "params")) -> None:
    """Every rank's losses/norms, and every replica's gradients and parameters, match the reference."""
    for r in ranks:
        for a, b in zip(r["losses"] + r["norms"], ref["losses"] + ref["norms"]):
            assert abs(a - b) <= tol * abs(b), (a, b)
    for key in keys:
        for d in range(dp):
            full = assemble([r for r in ranks if r["dp_rank"] == d], key, tp)
            assert full.keys() == ref[key].keys()
            for n, t in full.items():
                assert t.shape == ref[key][n].shape, n
                assert rel(t, ref[key][n]) < tol, (key, d, n, rel(t, ref[key][n]))


def run_single_and_parallel(args_for, world: int) -> tuple[list[dict], list[dict]]:
    """Run the CLI once in-process and once on `world` forked ranks; args_for(run_dir, parallel) builds
    the arguments. Returns both runs' metrics.jsonl records."""
    from scaletrain.cli import main

    from conftest import read_metrics
    from dist_harness import cli_rank, run_ranks

    single, parallel = args_for(False), args_for(True)
    assert main(single[1]) == 0
    assert run_ranks(world, cli_rank, parallel[1], timeout=240) == [0] * world
    return read_metrics(single[0]), read_metrics(parallel[0])


def assert_same_steps(a: list[dict], b: list[dict], tol: float = 1e-10, loss_abs: float = 0.0) -> None:
    """Every step's loss and gradient norm agree within `tol` relative (the loss also within `loss_abs`
    absolute: a policy-gradient loss of centred advantages is ≈ 0, its digits are rounding)."""
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= tol * abs(x["loss"]) + loss_abs, (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= tol * abs(x["grad_norm"]), (x["step"], x["grad_norm"], y["grad_norm"])
