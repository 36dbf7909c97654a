"""Expert-parallel decoding (generation/ep_lockstep.py): the ranks of an ep group decode different rows — a
different number of rows and microbatches, stopping at different steps — yet every rank's MoE all-to-all
meets its peers' in every pass (padding passes where a rank has fewer microbatches or has finished), so
nothing hangs and each rank samples exactly what one process sampling its prompts alone does (float64)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.parity

PROMPTS = [[[4, 5]], [[7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33]]]  # rank 0: 1 prompt, rank 1: 3
MAX_NEW = [3, 8]  # ... and its own last step: rank 0 finishes long before rank 1


def _model(ep: int, rank: int, world: int):
    from scaletrain.config.moe import MoEConfig
    from scaletrain.config.schema import ModelConfig, ParallelConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.distributed import ParallelDims
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters
    from scaletrain.parallel.parallelize import parallelize

    par = ParallelConfig(ep=ep)
    dims = ParallelDims.from_config(par, world, rank) if world > 1 else ParallelDims.single()
    m = resolve_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                                  vocab_size=64, init_std=0.5,
                                  moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=32)),
                      tokenizer_vocab=None, tp=1, seq_length=32)
    with torch.device("meta") if ep > 1 else torch.device("cpu"):
        model = build_model(m, tp_size=1, dtype=torch.float64)
    model = parallelize(model, dims, par, torch.device("cpu"))
    init_parameters(model, 3)
    return model, dims


def _sample(model, dims, who: int, kv_cache: bool | None):
    from scaletrain.generation.sampler import sample_completions, sampling_generator
    from scaletrain.trainer.precision import Precision

    return sample_completions(
        model, dims, PROMPTS[who], [sampling_generator(2, 10 * who + i) for i in range(len(PROMPTS[who]))],
        group_size=2, max_new_tokens=MAX_NEW[who], temperature=1.0, stop_ids=set(range(1, 12)), pad_id=0,
        vocab_limit=60, micro_batch=1, precision=Precision(torch.float64, None, "cpu", "test"),
        device=torch.device("cpu"), kv_cache=kv_cache)


def _share(model, dims):
    """`sample_share` of one prompt over dp: one replica has nothing to sample."""
    from scaletrain.generation.sampler import sample_share
    from scaletrain.trainer.precision import Precision

    return sample_share(model, dims, PROMPTS[1][:1], seed=5, group_size=2, micro_batch=1, max_new_tokens=8,
                        temperature=1.0, stop_ids=set(range(1, 12)), pad_id=0, vocab_limit=60,
                        precision=Precision(torch.float64, None, "cpu", "test"), device=torch.device("cpu"))


def _ep_rank(rank: int, world: int) -> tuple:
    from scaletrain.generation.ep_lockstep import lockstep_group

    model, dims = _model(2, rank, world)
    assert lockstep_group(model, dims) is not None
    return _sample(model, dims, rank, None), _sample(model, dims, rank, False), _share(model, dims)


def test_ep_ranks_with_uneven_passes_decode_in_lock_step_like_one_process():
    """ep2 over dp2: rank 0 decodes 2 rows (2 microbatches) for at most 3 tokens, rank 1 6 rows for up to 8,
    with the KV cache (finished rows leave the passes) and by recomputation; and `sample_share` of a single
    prompt (one replica has none). No hang (60 s bound), and the completions equal one process's."""
    from scaletrain.distributed import ParallelDims
    from scaletrain.generation.ep_lockstep import lockstep_group

    from dist_harness import run_ranks

    single, _ = _model(1, 0, 1)
    assert lockstep_group(single, ParallelDims.single()) is None  # no agreement at ep = 1
    expected = [_sample(single, ParallelDims.single(), who, None) for who in (0, 1)]
    assert expected == [_sample(single, ParallelDims.single(), who, False) for who in (0, 1)]
    lengths = {len(c) for c in expected[1][0]}
    assert len(lengths) > 1 and max(lengths) > MAX_NEW[0]  # rows stop at different steps, rank 1 runs longer
    shared = _share(single, ParallelDims.single())
    for rank, (cached, recomputed, share) in enumerate(run_ranks(2, _ep_rank, timeout=60)):
        assert cached == recomputed == expected[rank], rank
        assert share == shared  # the replica without a prompt ran padding passes, the other's are the same
