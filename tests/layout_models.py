"""The small models, batches and training runs the layout parity tests share (tensor / sequence parallel,
pipeline, data parallel, the p2p transports, the oldest-torch leg): each runs on every rank of a forked
layout or once in-process as the single-process reference."""

from __future__ import annotations

import torch

from scaletrain.config.schema import ModelConfig, ParallelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.distributed import ParallelDims
from scaletrain.models import build_model
from scaletrain.nn import init_parameters
from scaletrain.parallel.parallelize import parallelize

from parity import randomise_qkv_bias, train_and_record

PIPELINE_STEPS = 5
TP_STEPS = 5


def pipeline_config(tied: bool) -> ModelConfig:
    return resolve_model(ModelConfig(vocab_size=128, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                                     ffn_hidden_size=64, tie_embeddings=tied, qkv_bias=True),
                         tokenizer_vocab=None, tp=1, seq_length=8)


def pipeline_batches(n_micro: int) -> list[list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(PIPELINE_STEPS):
        mbs = []
        for _ in range(n_micro):
            t = torch.randint(0, 128, (2, 9), generator=g)
            mbs.append({"tokens": t[:, :-1], "labels": t[:, 1:],
                        "loss_mask": (torch.rand(2, 8, generator=g) > 0.25).long()})
        out.append(mbs)
    return out


def pipeline_train(rank: int, world: int, cfg: ModelConfig, tp: int, pp: int, vpp: int, sp: bool, n_micro: int) -> dict:
    """One rank of a tp·pp(·vpp) layout (or, at world 1, the reference): float64 training, recorded."""
    pcfg = ParallelConfig(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sp)
    dims = ParallelDims.from_config(pcfg, world, rank)
    with torch.device("meta"):
        model = build_model(cfg, tp_size=tp, dtype=torch.float64)
    parallelize(model, dims, pcfg, torch.device("cpu"))
    init_parameters(model, seed=5, tp_rank=dims.tp_rank, tp_size=tp)
    randomise_qkv_bias(model, tp, dims.tp_rank)
    return train_and_record(model, dims, pipeline_batches(n_micro), torch.float64)


def tp_config(tied: bool, kv: int) -> ModelConfig:
    return resolve_model(ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=kv,
                                     ffn_hidden_size=96, tie_embeddings=tied, qkv_bias=True),
                         tokenizer_vocab=None, tp=1, seq_length=16)


def tp_batches(dtype_seed: int = 0) -> list[list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(dtype_seed)
    steps = []
    for _ in range(TP_STEPS):
        mbs = []
        for _ in range(2):
            tokens = torch.randint(0, 128, (2, 17), generator=g)
            mask = (torch.rand(2, 16, generator=g) > 0.2).long()
            mbs.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
        steps.append(mbs)
    return steps


def tp_train(rank: int, world: int, cfg: ModelConfig, sp: bool, dtype: torch.dtype) -> dict:
    """Runs on every rank (or once, in-process, as the reference). Returns local tensors."""
    dims = ParallelDims.from_config(ParallelConfig(tp=world, sequence_parallel=sp), world, rank)
    model = build_model(cfg, tp_size=world, dtype=dtype)
    parallelize(model, dims, ParallelConfig(tp=world, sequence_parallel=sp))
    init_parameters(model, seed=11, tp_rank=dims.tp_rank, tp_size=world)
    randomise_qkv_bias(model, world, dims.tp_rank)
    batches = tp_batches()
    with torch.no_grad():
        logits = model(batches[0][0]["tokens"]).clone()
    return {"logits": logits, **train_and_record(model, dims, batches, dtype)}
