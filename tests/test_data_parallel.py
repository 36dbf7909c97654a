"""Data parallelism (bucketed gradient all-reduce) in full 3D layouts against one process: float64 1e-10."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.distributed import ParallelDims
from scaletrain.models import build_model
from scaletrain.nn import init_parameters
from scaletrain.parallel.parallelize import parallelize

from dist_harness import run_ranks
from layout_models import pipeline_batches
from parity import assert_matches, randomise_qkv_bias, train_and_record

pytestmark = pytest.mark.parity


def _cfg(tied: bool) -> ModelConfig:
    return resolve_model(ModelConfig(vocab_size=128, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                                     ffn_hidden_size=64, tie_embeddings=tied, qkv_bias=True),
                         tokenizer_vocab=None, tp=1, seq_length=8)


def _train(rank: int, world: int, cfg: ModelConfig, pcfg: ParallelConfig, n_micro_total: int) -> dict:
    dims = ParallelDims.from_config(pcfg, world, rank)
    with torch.device("meta"):
        model = build_model(cfg, tp_size=pcfg.tp, dtype=torch.float64)
    parallelize(model, dims, pcfg, torch.device("cpu"))
    init_parameters(model, seed=5, tp_rank=dims.tp_rank, tp_size=pcfg.tp)
    randomise_qkv_bias(model, pcfg.tp, dims.tp_rank)
    per_rank = n_micro_total // dims.dp
    mine = [step[dims.dp_rank * per_rank:(dims.dp_rank + 1) * per_rank] for step in pipeline_batches(n_micro_total)]
    return train_and_record(model, dims, mine, torch.float64)  # each dp rank trains on its slice


CASES = [  # (tp, pp, dp, sp, tied, microbatches in the global batch)
    (1, 1, 2, False, False, 4),
    (2, 2, 2, False, True, 4),
    (2, 2, 2, True, False, 4),
    (2, 1, 4, True, True, 4),
    (1, 2, 2, False, True, 6),
]


@pytest.mark.parametrize("tp,pp,dp,sp,tied,n_micro", CASES)
def test_dp_layouts_match_single_process_float64(tp, pp, dp, sp, tied, n_micro):
    cfg = _cfg(tied)
    ref = _train(0, 1, cfg, ParallelConfig(), n_micro)
    ranks = run_ranks(tp * pp * dp, _train, cfg, ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp), n_micro,
                      timeout=180)
    assert_matches(ranks, ref, tp, 1e-10, dp=dp)


def _train_zero(rank: int, world: int, cfg: ModelConfig, pcfg: ParallelConfig, n_micro_total: int) -> dict:
    """The same run with the distributed optimizer (ZeRO-1); records like train_and_record."""
    from scaletrain.trainer.optimizer import build_optimizer

    dims = ParallelDims.from_config(pcfg, world, rank)
    with torch.device("meta"):
        model = build_model(cfg, tp_size=pcfg.tp, dtype=torch.float64)
    parallelize(model, dims, pcfg, torch.device("cpu"), shard_optimizer=True)
    init_parameters(model, seed=5, tp_rank=dims.tp_rank, tp_size=pcfg.tp)
    randomise_qkv_bias(model, pcfg.tp, dims.tp_rank)
    per_rank = n_micro_total // dims.dp
    mine = [step[dims.dp_rank * per_rank:(dims.dp_rank + 1) * per_rank] for step in pipeline_batches(n_micro_total)]
    opt_cfg = OptimConfig(lr=1e-2, weight_decay=0.1, distributed=True)
    return train_and_record(model, dims, mine, torch.float64,
                            optimizer=build_optimizer(model, opt_cfg, torch.device("cpu"), dims))


@pytest.mark.parametrize("tp,pp,dp,sp,tied,n_micro", [(1, 1, 2, False, False, 4), (2, 2, 2, True, True, 4),
                                                      (2, 1, 4, False, False, 4)])
def test_distributed_optimizer_matches_single_process_float64(tp, pp, dp, sp, tied, n_micro):
    cfg = _cfg(tied)
    ref = _train(0, 1, cfg, ParallelConfig(), n_micro)
    ranks = run_ranks(tp * pp * dp, _train_zero, cfg, ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp), n_micro,
                      timeout=180)
    # Under ZeRO a rank's .grad buffers keep the unreduced local sums (only its shard is reduced), so
    # losses, gradient norms and the updated parameters are what must match.
    assert_matches(ranks, ref, tp, 1e-10, dp=dp, keys=("params",))
