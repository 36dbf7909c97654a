"""Shared fixtures: a tokenizer and a Megatron dataset built once per session from the bundled corpus."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from scaletrain.cli import main
from scaletrain.data.preprocess import BUILTIN_CORPUS, preprocess
from scaletrain.data.tokenizer import train_sentencepiece

torch.set_num_threads(1)  # results depend on the thread count; tests and references agree on one
if not torch.cuda.is_available():  # fused Triton kernels run through Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


def corpus_texts(limit: int | None = None) -> list[str]:
    with gzip.open(BUILTIN_CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:limit] if limit else texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_sentencepiece(corpus_texts(), out, 512)
    return out


@pytest.fixture(scope="session")
def dataset_prefix(tmp_path_factory, tokenizer_dir) -> str:
    out = tmp_path_factory.mktemp("data") / "kjv"
    preprocess([str(BUILTIN_CORPUS)], str(tokenizer_dir), str(out), workers=1)
    return str(out)


def tiny_overrides(run_dir: Path, tokenizer_dir: Path, prefix: str, **extra) -> list[str]:
    """--set items for a seconds-long run of configs/tiny.toml on the session dataset."""
    values = {
        "train.run_dir": str(run_dir), "data.tokenizer": str(tokenizer_dir), "data.prefixes": f'["{prefix}"]',
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.ffn_hidden_size": 64, "train.seq_length": 32, "train.global_batch_size": 4,
        "train.micro_batch_size": 2, "train.steps": 12, "train.eval_interval": 0, "optim.warmup_steps": 2,
        "checkpoint.interval": 0, "logging.interval": 1000, "logging.tensorboard": False,
    }
    values.update(extra)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.toml")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """The synthetic task's SFT rows (64), as GRPO prompts (`answer` for math_answer)."""
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(out), "--train", "64", "--test", "5"]) == 0
    return out / "sft_train.jsonl"


def grpo_args(run_dir, tokenizer_dir, prefix, prompts, **extra) -> list[str]:
    """`scaletrain grpo` on the synthetic prompts: 3 float64 steps of 2 groups of 4 (test_grpo, test_dapo)."""
    args = ["grpo", "--config", TINY]
    for s in tiny_overrides(run_dir, tokenizer_dir, prefix, **{
            "posttrain.chat.train_data": f'["{prompts}"]', "train.seq_length": 96, "model.num_layers": 4,
            "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.steps": 3, "precision.dtype": "float64",
            "posttrain.grpo.group_size": 4, "posttrain.rollout.max_new_tokens": 6, "posttrain.rewards.functions": '["grpo_rewards:digits"]',
            "posttrain.grpo.beta": 0.1, "optim.warmup_steps": 1, **extra}):
        args += ["--set", s]
    return args
