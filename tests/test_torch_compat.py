"""The torch versions clusters run (torch 2.11 … 2.14): the flat collectives fall back to the names torch
2.11 has, and the fallback computes what the native path and an independent reference compute.

On torch 2.13 both name pairs exist (the older ones are deprecated aliases), so the fallback is forced here
by swapping the module's chosen pair inside each forked rank; on torch 2.11 (the oldest-torch CI leg) the
fallback is the path chosen at import."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from scaletrain.distributed import comm as comm_mod

from dist_harness import run_ranks
from parity import assert_matches, rel

pytestmark = pytest.mark.parity


def _old_api() -> SimpleNamespace:
    """torch.distributed as torch 2.11 exposes it: no *_single collectives."""
    return SimpleNamespace(all_gather_into_tensor=dist.all_gather_into_tensor,
                           reduce_scatter_tensor=dist.reduce_scatter_tensor)


def test_flat_collectives_fall_back_where_the_new_names_are_missing():
    def ag(*a, **k):
        return None

    def rs(*a, **k):
        return None

    new = SimpleNamespace(all_gather_single=ag, reduce_scatter_single=rs, all_gather_into_tensor=print,
                          reduce_scatter_tensor=print)
    assert comm_mod.flat_collectives(new) == (ag, rs)
    assert comm_mod.flat_collectives(_old_api()) == (dist.all_gather_into_tensor, dist.reduce_scatter_tensor)
    with pytest.raises(ImportError, match="torch >= 2.11"):
        comm_mod.flat_collectives(SimpleNamespace(all_gather_into_tensor=ag))
    # What this torch gets at import: the new names where they exist, else the old ones.
    native = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    assert comm_mod.all_gather_flat is native


def _collectives(rank: int, world: int, fallback: bool) -> dict[str, torch.Tensor]:
    """Every Comm flat collective on the world group and on 2-rank subgroups, with the chosen pair or the
    forced fallback, next to a reference built from list all_gather and all_reduce (integer-valued
    float64: sums are exact in any order)."""
    if fallback:
        comm_mod.all_gather_flat, comm_mod.reduce_scatter_flat = comm_mod.flat_collectives(_old_api())
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]  # every rank creates every group
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(100 + rank)
    for name, group, size, grank in (("world", None, world, rank), ("pair", pairs[rank // 2], 2, rank % 2)):
        comm = comm_mod.Comm(group, size, grank, name)
        x = torch.randint(-50, 50, (3, 2 * size, 5), generator=g).double()
        for dim in (0, 1):
            got = comm.all_gather(x, dim)
            parts = [torch.empty_like(x) for _ in range(size)]
            dist.all_gather(parts, x.contiguous(), group=group)
            out[f"{name}.all_gather.{dim}"] = got
            out[f"{name}.all_gather.{dim}.ref"] = torch.cat(parts, dim)
        for dim in (1, 2) if size == 2 else (1,):
            y = x if dim == 1 else torch.randint(-50, 50, (3, 4, 2 * size), generator=g).double()
            got = comm.reduce_scatter(y, dim)
            total = y.clone()
            dist.all_reduce(total, group=group)
            out[f"{name}.reduce_scatter.{dim}"] = got
            out[f"{name}.reduce_scatter.{dim}.ref"] = total.chunk(size, dim)[grank]
        flat = torch.randint(-50, 50, (4 * size,), generator=g).double()
        shard = torch.empty(4, dtype=flat.dtype)
        work = comm.reduce_scatter_async(shard, flat)
        assert work is not None
        work.wait()
        total = flat.clone()
        dist.all_reduce(total, group=group)
        out[f"{name}.reduce_scatter_async"] = shard
        out[f"{name}.reduce_scatter_async.ref"] = total.chunk(size)[grank]
    return out


def test_fallback_collectives_equal_the_native_path_and_a_reference_over_gloo():
    native = run_ranks(4, _collectives, False)
    fallback = run_ranks(4, _collectives, True)
    for r in range(4):
        assert native[r].keys() == fallback[r].keys()
        for k, v in fallback[r].items():
            assert torch.equal(v, native[r][k]), (r, k)
            if not k.endswith(".ref"):
                assert torch.equal(v, fallback[r][k + ".ref"]), (r, k)


def _tp_train_with_fallback(rank: int, world: int, *args):
    from layout_models import tp_train

    comm_mod.all_gather_flat, comm_mod.reduce_scatter_flat = comm_mod.flat_collectives(_old_api())
    assert comm_mod.all_gather_flat is dist.all_gather_into_tensor
    return tp_train(rank, world, *args)


def test_tp2_sequence_parallel_training_on_the_fallback_matches_single_process_float64():
    """The model-level proof: 5 AdamW steps at tp2+SP (all-gathers and reduce-scatters in every block) with
    the torch-2.11 collectives equal the single process within 1e-10, on whatever torch runs the test."""
    from layout_models import tp_config, tp_train

    cfg = tp_config(True, 2)
    ref = tp_train(0, 1, cfg, False, torch.float64)
    ranks = run_ranks(2, _tp_train_with_fallback, cfg, True, torch.float64)
    assert rel(torch.cat([r["logits"] for r in ranks], dim=-1), ref["logits"]) < 1e-10
    assert_matches(ranks, ref, 2, 1e-10)


# Where compiled float64 attention runs (torch >= 2.13), test_compile.py checks all of this in float64.
FLOAT64_COMPILE = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


@pytest.mark.slow
@pytest.mark.skipif(FLOAT64_COMPILE, reason="test_compile.py covers compiled tp2+SP/cp2 in float64 on this torch")
@pytest.mark.parametrize("split", [{"parallel.tp": 2, "parallel.sequence_parallel": True}, {"parallel.cp": 2}],
                         ids=["tp2sp", "cp2"])
def test_compiled_collectives_trace_without_graph_breaks_float32(tmp_path, tokenizer_dir, dataset_prefix, split):
    """The traced path (functional collectives under torch.compile) on this torch: one graph per rank, no
    graph breaks (funcol's own gather_dim≠0 path breaks the graph on torch 2.11), and the same losses as
    one eager process. float32: compiled float64 attention backward on CPU fails inside torch 2.11's
    inductor (test_compile.py covers float64 on newer torch)."""
    from scaletrain.cli import main

    from conftest import TINY, read_metrics, tiny_overrides
    from dist_harness import compiled_cli_rank
    from parity import assert_same_steps

    def args_for(par: bool) -> tuple:
        run = tmp_path / str(par)
        layout = {"parallel.compile": True, "parallel.recompute": "full", **split} if par else {}
        args = ["train", "--config", TINY]
        for item in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
                "precision.dtype": "float32", "train.steps": 3, **layout}):
            args += ["--set", item]
        return run, args

    (single, a_args), (parallel, b_args) = args_for(False), args_for(True)
    assert main(a_args) == 0
    ranks = run_ranks(2, compiled_cli_rank, b_args, timeout=240)
    assert [rc for rc, _, _ in ranks] == [0, 0]
    assert all(graphs == 1 and breaks == {} for _, graphs, breaks in ranks), ranks
    assert_same_steps(read_metrics(single), read_metrics(parallel), 1e-5)


def test_compiled_blockwise_attention_has_the_eager_gradients_float32():
    """torch 2.11's compiled autograd.Function gives an output built by slice writes into a buffer no
    gradient: the blockwise attention of cp (and of packed rows on CPU) trained with dq = dk = dv = 0 under
    parallel.compile in float32 (the buffer is returned as is when no dtype cast is needed)."""
    from scaletrain.nn.blockwise_attention import QuerySegment, blockwise_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 8, 4, 8, generator=g), torch.randn(2, 16, 2, 8, generator=g), torch.randn(2, 16, 2, 8, generator=g)
    w = torch.randn(2, 8, 32, generator=g)
    segments = (QuerySegment(0, 0, 4), QuerySegment(4, 12, 4))  # cp rank 0 of 2 at s = 16

    def loss(q, k, v):
        return (blockwise_attention(q, k, v, segments, None, None, block=8) * w).sum()

    grads = []
    for fn in (loss, torch.compile(loss, backend="aot_eager")):  # the fault is in AOT autograd, not inductor
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    torch._dynamo.reset()
    for eager, compiled in zip(*grads):
        assert eager.abs().max() > 0.1
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
