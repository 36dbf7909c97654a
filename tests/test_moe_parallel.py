"""Expert parallelism against the single process, through the real entry point, in float64: losses,
gradient norms and routing metrics of every step agree to 1e-10 (dropless) at ep2, ep2·tp2+SP, ep2·pp2
and ep2·dp2 with ZeRO-1; with capacity dropping the same tokens are dropped at every layout."""

from __future__ import annotations

import pytest

from conftest import TINY, tiny_overrides
from parity import assert_same_steps, run_single_and_parallel

pytestmark = pytest.mark.parity

MOE = {"model.moe.num_experts": 4, "model.moe.top_k": 2, "model.moe.expert_ffn_hidden_size": 32,
       "model.moe.aux_loss_coef": 0.05, "model.moe.z_loss_coef": 0.01, "precision.dtype": "float64",
       "train.steps": 4, "optim.warmup_steps": 1}
ROUTING = ("moe_aux_loss", "moe_z_loss", "moe_expert_tokens_min", "moe_expert_tokens_max", "moe_expert_tokens_cv",
           "moe_dropped_fraction")


def _args(run_dir, tokenizer_dir, prefix, **extra) -> list[str]:
    args = ["train", "--config", TINY]
    for item in tiny_overrides(run_dir, tokenizer_dir, prefix, **{**MOE, **extra}):
        args += ["--set", item]
    return args


def _compare(tmp_path, tokenizer_dir, dataset_prefix, layout: dict, world: int, **model) -> list[dict]:
    single, parallel = run_single_and_parallel(
        lambda par: (tmp_path / str(par), _args(tmp_path / str(par), tokenizer_dir, dataset_prefix,
                                                **model, **(layout if par else {}))), world)
    assert_same_steps(single, parallel, 1e-10)
    for a, b in zip(single, parallel):
        for key in ROUTING:
            assert abs(a[key] - b[key]) <= 1e-10 * max(abs(a[key]), 1e-12), (a["step"], key, a[key], b[key])
    return single


@pytest.mark.parametrize("name,layout,world,model", [
    ("ep2", {"parallel.ep": 2}, 2, {}),
    ("ep2-tp2-sp", {"parallel.ep": 2, "parallel.tp": 2, "parallel.sequence_parallel": True}, 4,
     {"model.moe.score_fn": "sigmoid", "model.moe.bias_update_rate": 0.01, "model.moe.shared_ffn_hidden_size": 32}),
    ("ep2-pp2", {"parallel.ep": 2, "parallel.pp": 2}, 4, {"model.num_layers": 4, "model.moe.layer_freq": 2}),
    # interleaved 1F1B: two virtual stages per pp rank, each with its MoE layer
    ("ep2-pp2-vpp2", {"parallel.ep": 2, "parallel.pp": 2, "parallel.vpp": 2}, 4,
     {"model.num_layers": 4, "train.micro_batch_size": 1}),
    # tp without SP: experts tp-sharded, the router's partial gradients summed over tp
    ("tp2", {"parallel.tp": 2}, 2, {"model.moe.shared_ffn_hidden_size": 32}),
    # a first stage of dense layers only still joins the step's MoE collectives (pp all-reduce of the metrics)
    ("pp2-dense-first-stage", {"parallel.pp": 2}, 2, {"model.num_layers": 4, "model.moe.first_dense_layers": 2}),
    ("ep2-dp2-zero1", {"parallel.ep": 2, "optim.distributed": True}, 4,
     {"model.moe.shared_ffn_hidden_size": 32, "train.micro_batch_size": 1}),
    # Full recomputation reruns each block's forward in backward: its routing is not recorded twice; validation
    # passes (forward only, dropless) run through the same all-to-alls.
    ("ep2-recompute-eval", {"parallel.ep": 2, "parallel.recompute": "full"}, 2, {"train.eval_interval": 2}),
    # ep taken from dp × cp; the z-loss is a per-token mean, so it survives the sequence split exactly (the aux
    # loss, a product of means, is computed per cp share: docs/moe.md).
    ("ep2-cp2", {"parallel.ep": 2, "parallel.cp": 2}, 4, {"model.moe.aux_loss_coef": 0.0}),
])
def test_expert_parallel_matches_single_process(tmp_path, tokenizer_dir, dataset_prefix, name, layout, world, model):
    steps = _compare(tmp_path, tokenizer_dir, dataset_prefix, layout, world, **model)
    assert all(s["moe_dropped_fraction"] == 0 for s in steps)  # dropless


def test_capacity_drops_the_same_tokens_at_every_layout(tmp_path, tokenizer_dir, dataset_prefix):
    """A tight capacity drops a share of the assignments; the losses (which depend on exactly which) and the
    dropped fraction agree with the single process at ep2·dp2 with ZeRO-1."""
    steps = _compare(tmp_path, tokenizer_dir, dataset_prefix, {"parallel.ep": 2, "optim.distributed": True}, 4,
                     **{"model.moe.capacity_factor": 0.75, "train.micro_batch_size": 1})
    assert all(s["moe_dropped_fraction"] > 0.05 for s in steps)


@pytest.mark.parametrize("saved,resumed", [
    ({"parallel.ep": 2, "parallel.tp": 2}, {}),  # ep2·tp2 → one process
    ({}, {"parallel.ep": 2, "parallel.tp": 2}),  # one process → ep2·tp2
    ({"parallel.ep": 2, "optim.distributed": True}, {"parallel.ep": 4, "optim.distributed": True}),
])
def test_experts_reshard_across_ep_sizes(tmp_path, tokenizer_dir, dataset_prefix, saved, resumed):
    """Expert weights and their AdamW state are stored with global shapes ([E, …]): a run saved at one ep size
    resumes at another and continues the uninterrupted single-process run's losses (float64, 1e-10)."""
    from scaletrain.checkpoint.files import stored_tensors
    from scaletrain.cli import main

    from conftest import read_metrics
    from dist_harness import cli_rank, run_ranks

    extra = {"train.micro_batch_size": 1, "model.moe.bias_update_rate": 0.01, "train.steps": 4}
    assert main(_args(tmp_path / "reference", tokenizer_dir, dataset_prefix, **extra)) == 0
    run = tmp_path / "run"
    for layout, more in ((saved, {"train.exit_interval": 2}), (resumed, {})):
        world = 4 if layout else 1
        args = _args(run, tokenizer_dir, dataset_prefix, **extra, **layout, **more)
        assert (run_ranks(world, cli_rank, args, timeout=240) == [0] * world) if layout else main(args) == 0
    shapes = stored_tensors(run / "checkpoints" / "step_0000002")
    assert shapes["model.layers.0.mlp.experts.gate_up"][0] == (4, 2, 32, 32)
    assert shapes["optim.state.layers.1.mlp.experts.down.exp_avg"][0] == (4, 32, 32)
    assert shapes["model.layers.1.mlp.router.expert_bias"][0] == (4,)
    reference, resumed_run = read_metrics(tmp_path / "reference"), read_metrics(run)
    assert len(resumed_run) == 4
    assert_same_steps(reference, resumed_run, 1e-10)


def test_dispatch_traffic_equals_theory():
    """benchmarks/bench_moe_comm.py's count at ep2, small: all-to-all bytes = 4·ep·k·N·h·4 per layer and
    microbatch, counts ep·8E (ratio 1.00: no padding, nothing sent twice)."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_moe_comm", REPO / "benchmarks" / "bench_moe_comm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    rows = bench.traffic(2, 2, 32, 2, 16, 2)
    assert [(op, got, ratio) for _, op, _, got, want, ratio, *_ in rows] == [
        ("all_to_all", 4 * 2 * 2 * 2 * (2 * 16 * 2) * 32 * 4, 1.0), ("all_to_all_counts", 2 * 2 * 2 * 8 * 8, 1.0)]
