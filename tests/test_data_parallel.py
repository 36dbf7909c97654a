"""Data parallelism (bucketed gradient all-reduce) in full 3D layouts against one process: float64 1e-10."""

from __future__ import annotations

import pytest
import torch
from test_pipeline_parallel import _assemble, _batches, _rel

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.distributed import ParallelDims
from scaletrain.models import build_model
from scaletrain.nn import init_parameters, spec_of
from scaletrain.parallel.parallelize import parallelize
from scaletrain.trainer.objective import LanguageModelingObjective
from scaletrain.trainer.optimizer import build_optimizer
from scaletrain.trainer.precision import Precision
from scaletrain.trainer.step import train_step

from dist_harness import run_ranks


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
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qkv.bias"):
                full = torch.linspace(-0.1, 0.1, spec_of(p).global_shape[0], dtype=p.dtype)
                p.copy_(full.chunk(pcfg.tp)[dims.tp_rank])
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    objective = LanguageModelingObjective(dims.tp_comm)
    per_rank = n_micro_total // dims.dp
    out: dict = {"losses": [], "norms": [], "pp_rank": dims.pp_rank, "dp_rank": dims.dp_rank}
    for i, step in enumerate(_batches(n_micro_total)):
        mine = step[dims.dp_rank * per_rank:(dims.dp_rank + 1) * per_rank]  # this dp rank's slice
        r = train_step(model, optimizer, objective, mine, lr=1e-2, clip_grad=0.5,
                       precision=Precision(torch.float64, None, "cpu", "test"), device=torch.device("cpu"), dims=dims)
        out["losses"].append(r.loss)
        out["norms"].append(r.grad_norm)
        if i == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["shard_dims"] = {n: spec_of(p).shard_dim for n, p in model.named_parameters()}
    return out


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
    tol = 1e-10
    for r in ranks:
        for a, b in zip(r["losses"] + r["norms"], ref["losses"] + ref["norms"]):
            assert abs(a - b) <= tol * abs(b), (a, b)
    for key in ("grads", "params"):
        for d in range(dp):  # every dp replica holds the same model
            full = _assemble([r for r in ranks if r["dp_rank"] == d], key, tp)
            assert full.keys() == ref[key].keys()
            for n, t in full.items():
                assert _rel(t, ref[key][n]) < tol, (key, d, n, _rel(t, ref[key][n]))
