"""Communication posted before the compute that follows it (parallel.overlap_grad_reduce,
parallel.overlap_param_gather), read from the phase clock's event list (profile/phases.py: phases' begin/end
and marks for every posted collective; the same names appear in torch.profiler traces): each dp gradient
bucket's reduction starts inside the last backward of its pipeline stage while earlier blocks' backward is
still to run, and ZeRO-1's parameter all-gathers are posted at the start of the next forward, in forward
order, each waited for only where its first block runs. With overlap off the same run posts everything
after the backward / before the forward — and gives the same numbers."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.distributed import ParallelDims
from scaletrain.models import build_model
from scaletrain.nn import init_parameters
from scaletrain.parallel.parallelize import parallelize
from scaletrain.profile.phases import mark, recording
from scaletrain.stages.pretrain.objective import LanguageModelingObjective
from scaletrain.trainer.optimizer import build_optimizer
from scaletrain.trainer.precision import Precision
from scaletrain.trainer.step import train_step

from dist_harness import run_ranks

pytestmark = pytest.mark.parity

CPU = torch.device("cpu")


def _batches(n_micro: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 64, (n_micro, 2, 17), generator=g)
    return [{"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(2, 16)} for x in t]


def _run(rank: int, world: int, pcfg: ParallelConfig, zero: bool, dtype: torch.dtype, n_micro: int) -> dict:
    cfg = resolve_model(ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                                    ffn_hidden_size=64), tokenizer_vocab=None, tp=1, seq_length=16)
    dims = ParallelDims.from_config(pcfg, world, rank)
    with torch.device("meta"):
        model = build_model(cfg, dtype=dtype)
    parallelize(model, dims, pcfg, CPU, shard_optimizer=zero)
    init_parameters(model, seed=1)
    for key, block in model.layers.items():  # compute markers around each block (test instrumentation)
        block.register_forward_pre_hook(lambda m, a, key=key: mark(f"block{key}.forward"))
        block.register_full_backward_pre_hook(lambda m, g, key=key: mark(f"block{key}.backward"))
    opt = build_optimizer(model, OptimConfig(lr=1e-2, distributed=zero), CPU, dims)
    precision = Precision(dtype, dtype if dtype == torch.bfloat16 else None, "cpu", "t")
    losses, events = [], []
    for step in range(3):
        mbs = _batches(n_micro * dims.dp, step)[dims.dp_rank * n_micro:(dims.dp_rank + 1) * n_micro]
        with recording(CPU) as clock:
            losses.append(train_step(model, opt, LanguageModelingObjective(), mbs, lr=1e-2, clip_grad=1.0,
                                     precision=precision, device=CPU, dims=dims).loss)
        events.append(clock.events)
    buckets = model.grad_buckets
    owner = {f"block{k}": sorted({buckets._owner[id(p)].index for p in b.parameters()}) for k, b in model.layers.items()}
    return {"losses": losses, "events": events, "owner": owner, "buckets": len(buckets.buckets), "pp_rank": dims.pp_rank}


def _index(events: list, kind: str, what: str) -> list[int]:
    return [i for i, (k, w) in enumerate(events) if k == kind and w.startswith(what)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_parameter_gather_overlaps_the_next_forward(dtype):
    pcfg = ParallelConfig(bucket_mb=0.02)  # a few KiB per bucket: several buckets, about one per block
    on = run_ranks(2, _run, pcfg, True, dtype, 2, timeout=120)
    off = run_ranks(2, _run, ParallelConfig(bucket_mb=0.02, overlap_param_gather=False), True, dtype, 2, timeout=120)
    for r in on:
        assert r["buckets"] >= 4
        ev = r["events"][1]  # a step after an update: the gathers of the last step's update are pending
        posts, first_block = _index(ev, "mark", "zero.all_gather.post"), _index(ev, "mark", "block0.forward")[0]
        indices = [int(ev[i][1].split("[")[1][:-1]) for i in posts]
        assert len(posts) == r["buckets"] and max(posts) < first_block  # all posted as the forward starts …
        assert indices == sorted(indices, reverse=True)  # … in forward order (bucket 0 holds the last layers)
        last = r["owner"]["block3"][-1]
        wait_last = _index(ev, "mark", f"zero.all_gather.wait[{last}]")[0]
        assert first_block < wait_last < _index(ev, "mark", "block3.forward")[0]  # in flight under blocks 0–2
    for r in off:  # without overlap the gathers are posted and completed in the optimizer step, after the step's compute
        ev = r["events"][1]
        posts = _index(ev, "mark", "zero.all_gather.post")
        opt_begin, opt_end = _index(ev, "begin", "optimizer")[0], _index(ev, "end", "optimizer")[0]
        assert posts and opt_begin < min(posts) and max(_index(ev, "mark", "zero.all_gather.wait")) < opt_end
        assert max(_index(ev, "mark", "block")) < opt_begin
    assert [r["losses"] for r in on] == [r["losses"] for r in off]  # bit for bit


@pytest.mark.parametrize("zero", [False, True], ids=["all_reduce", "reduce_scatter"])
def test_dp_gradient_buckets_reduce_during_the_last_backward(zero):
    op = "dp.reduce_scatter.post" if zero else "dp.all_reduce.post"
    on = run_ranks(2, _run, ParallelConfig(bucket_mb=0.02), zero, torch.float32, 3, timeout=120)
    off = run_ranks(2, _run, ParallelConfig(bucket_mb=0.02, overlap_grad_reduce=False), zero, torch.float32, 3,
                    timeout=120)
    for r in on:
        ev = r["events"][2]
        last_bwd = _index(ev, "begin", "backward")[-1]
        posts = _index(ev, "mark", op)
        assert len(posts) == r["buckets"] and min(posts) > last_bwd  # the last microbatch's backward only
        end_bwd = _index(ev, "end", "backward")[-1]
        first_bucket_block = next(f"block{k}" for k in (3, 2, 1, 0) if r["owner"][f"block{k}"][0] == 0)
        # The bucket of the last block(s) is posted, then block 0's backward still runs: overlapped.
        assert min(posts) < _index(ev, "mark", "block0.backward")[-1] < end_bwd, first_bucket_block
    for r in off:
        ev = r["events"][2]
        assert min(_index(ev, "mark", op)) > _index(ev, "end", "backward")[-1]
    assert [r["losses"] for r in on] == [r["losses"] for r in off]


@pytest.mark.parametrize("vpp", [1, 2])
def test_under_pipelining_each_stage_reduces_during_its_own_last_backward(vpp):
    """pp2 × dp2 (1F1B, and interleaved with vpp 2): every rank posts its buckets inside a backward phase,
    before the schedule ends; interleaved, the later chunk's buckets go out before the rank's final backward
    (of its first chunk) has even begun."""
    pcfg = ParallelConfig(pp=2, vpp=vpp, bucket_mb=0.02)
    ranks = run_ranks(4, _run, pcfg, False, torch.float32, 4, timeout=180)
    for r in ranks:
        ev = r["events"][2]
        posts = _index(ev, "mark", "dp.all_reduce.post")
        ends = _index(ev, "end", "backward")
        inside = [p for p in posts if any(b < p < e for b, e in zip(_index(ev, "begin", "backward"), ends))]
        assert posts and inside == posts, (r["pp_rank"], len(inside), len(posts))  # all during a backward
        assert max(posts) < ends[-1] < _index(ev, "begin", "comm.dp_wait")[0]
        if vpp == 2:
            assert min(posts) < _index(ev, "begin", "backward")[-1]
