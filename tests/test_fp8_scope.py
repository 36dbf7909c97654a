"""FP8 stays out of decoding: the model's one FP8 entry (`fp8_context`, set by parallelize on
the te backend) is entered by training forwards only. KV-cache decoding ([b, 1] tokens), recomputed
decoding, rollout log-probs and evaluation run outside it — TE's FP8 GEMMs need token counts divisible
by 8/16. Observed on CPU through the same seam with a recording context in place of TE's autocast,
single process and pp2 (decoding through the pipeline schedule)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from scaletrain.config.schema import ModelConfig, OptimConfig, ParallelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.distributed import ParallelDims
from scaletrain.generation.sampler import sample_completions, sampling_generator
from scaletrain.generation.scoring import token_logprobs
from scaletrain.models import build_model
from scaletrain.nn import init_parameters
from scaletrain.parallel.parallelize import parallelize
from scaletrain.stages.pretrain.objective import LanguageModelingObjective
from scaletrain.trainer.optimizer import build_optimizer
from scaletrain.trainer.precision import Precision
from scaletrain.trainer.step import evaluate, train_step

from dist_harness import run_ranks

pytestmark = pytest.mark.parity

PRECISION = Precision(torch.float64, None, "cpu", "test")


def _model(pp: int, world: int, rank: int):
    par = ParallelConfig(pp=pp)
    dims = ParallelDims.from_config(par, world, rank)
    cfg = resolve_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                                    vocab_size=64), tokenizer_vocab=None, tp=1, seq_length=16)
    with torch.device("meta"):
        model = build_model(cfg, dtype=torch.float64)
    parallelize(model, dims, par)
    init_parameters(model, 3)
    entered: list[str] = []

    @contextlib.contextmanager
    def recording():
        entered.append("fp8")
        yield

    model.fp8_context = recording  # where parallelize puts TE's autocast factory
    return model, dims, entered


def _passes(rank: int, world: int, pp: int) -> dict[str, int]:
    model, dims, entered = _model(pp, world, rank)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 64, (2, 9), generator=g)
    mbs = [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(2, 8)}] * 2
    counts = {}

    def count(name, fn):
        entered.clear()
        fn()
        counts[name] = len(entered)

    kw = dict(group_size=2, max_new_tokens=4, temperature=1.0, stop_ids={1}, pad_id=0, vocab_limit=60, micro_batch=2,
              precision=PRECISION, device=torch.device("cpu"))
    count("decode_kv_cache", lambda: sample_completions(model, dims, [[4, 5], [7, 8, 9]],
                                                         [sampling_generator(0, i) for i in range(2)], **kw))
    count("decode_recomputed", lambda: sample_completions(model, dims, [[4, 5], [7, 8, 9]],
                                                           [sampling_generator(0, i) for i in range(2)],
                                                           kv_cache=False, **kw))
    count("logprobs", lambda: token_logprobs(model, dims, mbs, temperature=1.0, precision=PRECISION))
    objective = LanguageModelingObjective()
    count("evaluate", lambda: evaluate(model, objective, [mbs], precision=PRECISION, device=torch.device("cpu"),
                                       dims=dims))
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"), dims)
    count("train", lambda: train_step(model, optimizer, objective, mbs, lr=1e-3, clip_grad=1.0, precision=PRECISION,
                                      device=torch.device("cpu"), dims=dims))
    return counts


def test_fp8_is_entered_by_training_forwards_only():
    counts = _passes(0, 1, 1)
    assert counts.pop("train") == 2  # one forward per microbatch
    assert counts == {"decode_kv_cache": 0, "decode_recomputed": 0, "logprobs": 0, "evaluate": 0}


def test_fp8_stays_out_of_pipelined_decoding():
    for rank, counts in enumerate(run_ranks(2, _passes, 2, timeout=120)):
        assert counts.pop("train") == 2, rank  # each stage's chunk forward, per microbatch
        assert counts == {"decode_kv_cache": 0, "decode_recomputed": 0, "logprobs": 0, "evaluate": 0}, rank
