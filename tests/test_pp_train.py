"""Training through the real entry point with pipeline (and tensor) parallelism: checkpoints, resume."""

from __future__ import annotations

import pytest

from conftest import TINY, read_metrics, tiny_overrides
from dist_harness import cli_rank, run_ranks

pytestmark = pytest.mark.parity


def _args(run_dir, tokenizer_dir, prefix, **extra) -> list[str]:
    args = ["train", "--config", TINY]
    for item in tiny_overrides(run_dir, tokenizer_dir, prefix, **{
            "model.num_layers": 8, "train.global_batch_size": 16, "train.micro_batch_size": 2, **extra}):
        args += ["--set", item]
    return args


@pytest.mark.parametrize("layout", [
    {"parallel.pp": 4, "parallel.vpp": 2},
    {"parallel.pp": 2, "parallel.vpp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True,
     "model.tie_embeddings": True},
])
def test_pipeline_trains_checkpoints_and_resumes(tmp_path, tokenizer_dir, dataset_prefix, layout):
    world = layout["parallel.pp"] * layout.get("parallel.tp", 1)
    straight, stopped, single = tmp_path / "straight", tmp_path / "stopped", tmp_path / "single"
    steps = {"train.steps": 6, "train.eval_interval": 3}
    assert run_ranks(world, cli_rank, _args(straight, tokenizer_dir, dataset_prefix, **layout, **steps),
                     timeout=240) == [0] * world
    for expected in (4, 6):
        assert run_ranks(world, cli_rank, _args(stopped, tokenizer_dir, dataset_prefix, **layout, **steps,
                                                 **{"train.exit_interval": 4}), timeout=240) == [0] * world
        assert len(read_metrics(stopped)) == expected
    assert [r["loss"] for r in read_metrics(stopped)] == [r["loss"] for r in read_metrics(straight)]
    from scaletrain.cli import main

    tied = {"model.tie_embeddings": True} if layout.get("model.tie_embeddings") else {}
    assert main(_args(single, tokenizer_dir, dataset_prefix, **steps, **tied)) == 0
    for a, b in zip(read_metrics(straight), read_metrics(single)):  # pp/tp change float32 rounding only
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"]
        if "val_loss" in b:
            assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5 * b["val_loss"]
