"""Checkpoints independent of the layout: save at tp2·pp2·dp2, resume at other layouts (float64, 1e-10)."""

from __future__ import annotations

import shutil

import pytest

from scaletrain.cli import main

from conftest import TINY, read_metrics, tiny_overrides
from dist_harness import cli_rank, run_ranks

pytestmark = pytest.mark.parity

LAYOUT = {"model.num_heads": 8, "model.num_kv_heads": 4, "model.num_layers": 4, "model.ffn_hidden_size": 64,
          "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.steps": 6,
          "precision.dtype": "float64", "model.tie_embeddings": True}


def _args(run, tokenizer_dir, prefix, **extra) -> list[str]:
    args = ["train", "--config", TINY]
    for item in tiny_overrides(run, tokenizer_dir, prefix, **{**LAYOUT, **extra}):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module", params=[False, True], ids=["adamw", "zero1"])
def saved_at_tp2_pp2_dp2(request, tmp_path_factory, tokenizer_dir, dataset_prefix):
    """The same 3 steps saved at tp2·pp2·dp2, with the plain or the distributed optimizer."""
    tmp = tmp_path_factory.mktemp("reshard")
    assert main(_args(tmp / "reference", tokenizer_dir, dataset_prefix)) == 0  # one process, uninterrupted
    saved = tmp / "saved"
    layout = {"parallel.tp": 2, "parallel.pp": 2, "train.exit_interval": 3, "optim.distributed": request.param}
    assert run_ranks(8, cli_rank, _args(saved, tokenizer_dir, dataset_prefix, **layout), timeout=240) == [0] * 8
    assert len(read_metrics(saved)) == 3
    return tmp, [r["loss"] for r in read_metrics(tmp / "reference")], request.param


# (tp, pp, distributed optimizer on resume); (0, 0): a single process
@pytest.mark.parametrize("tp,pp,zero", [(1, 4, False), (4, 1, True), (1, 4, True), (0, 0, False)])
def test_resume_at_another_layout_continues_exactly(saved_at_tp2_pp2_dp2, tokenizer_dir, dataset_prefix, tp, pp, zero):
    tmp, reference, saved_zero = saved_at_tp2_pp2_dp2
    run = tmp / f"resumed-tp{tp}-pp{pp}-zero{zero}"
    shutil.copytree(tmp / "saved", run)
    if tp:
        code = run_ranks(8, cli_rank, _args(run, tokenizer_dir, dataset_prefix, **{
            "parallel.tp": tp, "parallel.pp": pp, "optim.distributed": zero}), timeout=240)
        assert code == [0] * 8
    else:
        assert main(_args(run, tokenizer_dir, dataset_prefix)) == 0
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 6
    for a, b in zip(losses, reference):  # the saved steps and the resumed ones
        assert abs(a - b) <= 1e-10 * abs(b), (saved_zero, a, b)
