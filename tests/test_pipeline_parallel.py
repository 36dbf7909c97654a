"""Pipeline parallelism (1F1B, interleaved) against the single-process model: float64 parity 1e-10."""

from __future__ import annotations

import os
import re

import pytest
import torch

from scaletrain.config.schema import OptimConfig, ParallelConfig
from scaletrain.distributed import ParallelDims
from scaletrain.models import build_model
from scaletrain.nn import init_parameters
from scaletrain.parallel.parallelize import parallelize
from scaletrain.parallel.pipeline.schedules import BWD, FWD, schedule_order
from scaletrain.parallel.pipeline.split import layer_layout
from scaletrain.stages.pretrain.objective import LanguageModelingObjective
from scaletrain.trainer.optimizer import build_optimizer
from scaletrain.trainer.precision import Precision
from scaletrain.trainer.step import train_step

from dist_harness import RankFailure, run_ranks
from layout_models import pipeline_batches, pipeline_config, pipeline_train
from parity import assert_matches

pytestmark = pytest.mark.parity



CASES = [  # (tp, pp, vpp, sp, microbatches, tied)
    (1, 2, 1, False, 4, False),
    (1, 2, 1, False, 3, True),     # microbatches not a multiple of pp
    (1, 2, 1, False, 1, False),    # fewer microbatches than stages
    (1, 4, 1, False, 5, True),
    (1, 2, 2, False, 4, True),     # interleaved
    (1, 2, 2, False, 2, False),
    (2, 2, 1, True, 3, True),      # tp·pp with sequence parallelism
    (2, 2, 1, False, 2, False),
]


@pytest.mark.parametrize("tp,pp,vpp,sp,n_micro,tied", CASES)
def test_pp_matches_single_process_float64(tp, pp, vpp, sp, n_micro, tied):
    cfg = pipeline_config(tied)
    ref = pipeline_train(0, 1, cfg, 1, 1, 1, False, n_micro)
    ranks = run_ranks(tp * pp, pipeline_train, cfg, tp, pp, vpp, sp, n_micro, timeout=120)
    assert_matches(ranks, ref, tp, 1e-10)


def test_layer_layout_and_schedule_tables():
    assert layer_layout(8, 2, 2) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    order = schedule_order(pp=4, vpp=1, rank=0, num_microbatches=6)
    assert order[:4] == [(FWD, 0, 0), (FWD, 0, 1), (FWD, 0, 2), (FWD, 0, 3)]  # pp-1 warm-up + first steady F
    assert order[4] == (BWD, 0, 0)
    # 1F1B's memory promise: stage 0 never has more than pp microbatches in flight.
    live = peak = 0
    for direction, _c, _m in order:
        live += 1 if direction == FWD else -1
        peak = max(peak, live)
    assert peak == 4
    last = schedule_order(pp=4, vpp=1, rank=3, num_microbatches=6)
    assert last[:2] == [(FWD, 0, 0), (BWD, 0, 0)]
    inter = schedule_order(pp=2, vpp=2, rank=0, num_microbatches=4)
    assert [a for a in inter if a[0] == FWD][:4] == [(FWD, 0, 0), (FWD, 0, 1), (FWD, 1, 0), (FWD, 1, 1)]
    for rank in range(2):
        acts = schedule_order(pp=2, vpp=2, rank=rank, num_microbatches=4)
        assert sorted(acts) == sorted({(d, c, m) for d in (FWD, BWD) for c in range(2) for m in range(4)})
    with pytest.raises(ValueError, match="multiple of pp"):
        schedule_order(pp=2, vpp=2, rank=0, num_microbatches=3)


def _dies_mid_schedule(rank: int, world: int) -> None:
    pcfg = ParallelConfig(pp=2)
    dims = ParallelDims.from_config(pcfg, world, rank)
    cfg = pipeline_config(False)
    with torch.device("meta"):
        model = build_model(cfg, dtype=torch.float64)
    parallelize(model, dims, pcfg)
    init_parameters(model, seed=1)
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"), dims)
    if rank == 1:
        os._exit(7)  # the last stage dies before it answers
    train_step(model, optimizer, LanguageModelingObjective(), pipeline_batches(4)[0], lr=1e-3, clip_grad=1.0,
               precision=Precision(torch.float64, None, "cpu", "t"), device=torch.device("cpu"), dims=dims)


def test_a_dead_stage_makes_the_others_fail_instead_of_hanging():
    with pytest.raises(RankFailure) as e:
        run_ranks(2, _dies_mid_schedule, timeout=60)
    msg = str(e.value)
    assert "rank 1 died with exit code 7" in msg
    # rank 0 is not left hanging: its own p2p call raises an error that names the peer and the cause.
    assert re.search(r"pipeline rank 0 \(global rank 0\): (starting|sending|receiving|completing).*pipeline rank 1 failed", msg)
    assert "did not finish" not in msg
