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
    ("ep2-pp2", {"parallel.ep": 2, "parallel.pp": 2}, 4, {"model.moe.first_dense_layers": 0}),
    ("ep2-dp2-zero1", {"parallel.ep": 2, "optim.distributed": True}, 4,
     {"model.moe.shared_ffn_hidden_size": 32, "train.micro_batch_size": 1}),
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
