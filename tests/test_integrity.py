"""Data and checkpoint integrity (issue 21 §4): index pointers, out-of-vocabulary ids, Megatron's index
cache after re-preprocessing, and checksummed checkpoint shards."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from scaletrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from scaletrain.checkpoint.checksums import MANIFEST
from scaletrain.cli import main
from scaletrain.config.schema import DataConfig, ModelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.data.gpt import build_gpt_datasets, check_data
from scaletrain.data.indexed import DatasetError, check_indexed_dataset
from scaletrain.data.preprocess import preprocess
from scaletrain.distributed import ParallelDims
from scaletrain.models import build_model
from scaletrain.nn import init_parameters

from conftest import TINY, corpus_texts, read_metrics, tiny_overrides
from dist_harness import cli_rank, run_ranks

pytestmark = pytest.mark.e2e


def _copy_dataset(prefix, dst) -> str:
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{prefix}{ext}", f"{dst}{ext}")
    return str(dst)


# ---------------------------------------------------------------- .idx pointers

def test_sequence_pointers_that_disagree_with_the_lengths_fail_fast(tmp_path, dataset_prefix):
    prefix = _copy_dataset(dataset_prefix, tmp_path / "p")
    info = check_indexed_dataset(prefix)
    raw = bytearray((tmp_path / "p.idx").read_bytes())
    at = 34 + info.sequences * 4 + 5 * 8  # pointer of sequence 5: sizes and lengths unchanged
    pointer = int.from_bytes(raw[at:at + 8], "little")
    raw[at:at + 8] = (pointer + 2).to_bytes(8, "little")  # one token off: reads the neighbour's tokens
    (tmp_path / "p.idx").write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"p\.idx: the pointer of sequence 5 is .* at byte .*corrupt.*preprocess"):
        check_indexed_dataset(prefix)


# ---------------------------------------------------------------- ids beyond the vocabulary

def _poke_token(prefix: str, position: int, token: int) -> None:
    data = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r+")
    data[position] = token
    data.flush()
    del data
    # A distinct mtime even on a coarse clock: (size, mtime) is the key of the scan's cache.
    os.utime(f"{prefix}.bin", ns=(token, token))


def test_out_of_vocabulary_ids_are_caught_although_meta_json_claims_otherwise(tmp_path, dataset_prefix):
    prefix = _copy_dataset(dataset_prefix, tmp_path / "v")
    meta = json.loads((tmp_path / "v.meta.json").read_text())
    assert meta["max_token_id"] == 511  # the sidecar's claim, which the check must not trust
    cfg = DataConfig(prefixes=(prefix,))
    check_data(cfg, model_vocab=512, tokenizer_vocab=512, tokenizer_sha256=None)  # clean: passes (and caches)
    _poke_token(prefix, 12345, 700)  # beyond the model's embedding table
    with pytest.raises(DatasetError, match=r"v contains token id 700 \(.*meta.json claims at most 511\) but "
                                           r"model.vocab_size is 512"):
        check_data(cfg, model_vocab=512, tokenizer_vocab=512, tokenizer_sha256=None)
    _poke_token(prefix, 12345, 600)  # inside a padded embedding table, but no token of the tokenizer
    with pytest.raises(DatasetError, match="contains token id 600 .* data.tokenizer has 512 tokens"):
        check_data(cfg, model_vocab=640, tokenizer_vocab=512, tokenizer_sha256=None)


def test_the_train_command_refuses_out_of_vocabulary_data_before_step_1(tmp_path, tokenizer_dir, dataset_prefix,
                                                                        capsys):
    prefix = _copy_dataset(dataset_prefix, tmp_path / "o")
    _poke_token(prefix, 999, 513)
    args = ["train", "--config", TINY]
    for item in tiny_overrides(tmp_path / "run", tokenizer_dir, prefix, **{"train.steps": 2}):
        args += ["--set", item]
    assert main(args) == 2
    assert "contains token id 513" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a single step ran


# ---------------------------------------------------------------- Megatron's index cache

def _samples(prefix: str, n: int = 4) -> list[list[int]]:
    train, _ = build_gpt_datasets(DataConfig(prefixes=(prefix,), split="90,10,0"), seq_length=32, seed=3, eod_id=2,
                                  vocab_size=512, train_samples=64, valid_samples=8)
    return [train[i]["tokens"].tolist() for i in range(n)]


def test_re_preprocessing_to_the_same_prefix_rebuilds_the_index_cache(tmp_path, tokenizer_dir):
    texts = corpus_texts()
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:300]))
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[600:680]))
    prefix = str(tmp_path / "same" / "d")
    preprocess([str(big)], str(tokenizer_dir), prefix)
    _samples(prefix)  # writes PREFIX/cache/ for the 300-document dataset
    preprocess([str(small)], str(tokenizer_dir), prefix)  # same prefix, 80 other documents
    fresh = str(tmp_path / "fresh" / "d")
    preprocess([str(small)], str(tokenizer_dir), fresh)
    # Before: the stale indices pointed at documents 80-299 (IndexError) or at the old text.
    assert _samples(prefix) == _samples(fresh)


def test_a_split_without_validation_documents_is_refused_not_a_hang(tmp_path, tokenizer_dir):
    src = tmp_path / "few.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()[:20]))
    preprocess([str(src)], str(tokenizer_dir), str(tmp_path / "few"))

    def build(split):
        return build_gpt_datasets(DataConfig(prefixes=(str(tmp_path / "few"),), split=split), seq_length=32,
                                  seed=1, eod_id=2, vocab_size=512, train_samples=16, valid_samples=0)

    # 2% of 20 documents rounds to none: Megatron would look for a validation sample forever.
    with pytest.raises(DatasetError, match=r"'98,2,0' gives dataset .*few \(20 documents\) no validation documents"):
        build("98,2,0")
    train, valid = build("100,0,0")
    assert len(train) >= 16 and valid is None


# ---------------------------------------------------------------- checkpoint checksums

def _model(seed: int = 0):
    cfg = resolve_model(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, ffn_hidden_size=48),
                        tokenizer_vocab=None, tp=1, seq_length=16)
    m = build_model(cfg)
    init_parameters(m, seed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randint(0, 64, (2, 8))).sum().backward()
    opt.step()
    return m, opt


def _flip_byte_in_data(shard) -> None:
    """Flip one bit in a tensor's data (past the safetensors header, whose JSON would fail to parse)."""
    raw = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header + (len(raw) - header) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))


def test_a_flipped_byte_in_a_shard_is_a_load_error_naming_the_file(tmp_path):
    m, opt = _model(1)
    path = save_checkpoint(tmp_path, 1, m, opt, {"consumed_samples": 4, "rng": {}}, dims=ParallelDims.single())
    manifest = json.loads((path / MANIFEST).read_text())
    shards = sorted(path.glob("*.safetensors"))
    assert sorted(manifest["files"]) == [s.name for s in shards] and manifest["algorithm"] == "sha256"
    load_checkpoint(path, *_model(2), dims=ParallelDims.single())  # intact: loads
    _flip_byte_in_data(shards[0])
    with pytest.raises(CheckpointError, match=f"(?s)checkpoint .* is corrupt.*{shards[0].name} cannot be read as it "
                                              "was saved.*sha256 differs.*earlier step_"):
        load_checkpoint(path, *_model(2), dims=ParallelDims.single())


def test_checkpoints_without_checksums_still_load_with_a_notice(tmp_path, capsys):
    m, opt = _model(1)
    path = save_checkpoint(tmp_path, 1, m, opt, {"consumed_samples": 4, "rng": {}}, dims=ParallelDims.single())
    (path / MANIFEST).unlink()  # as written by scaletrain before checksums
    m2, opt2 = _model(2)
    assert load_checkpoint(latest_checkpoint(tmp_path), m2, opt2, dims=ParallelDims.single())["consumed_samples"] == 4
    assert "has no checksums.json" in capsys.readouterr().err
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_tp2_shards_are_checksummed_by_their_ranks_and_verified_on_every_rank(tmp_path, tokenizer_dir, dataset_prefix):
    """Each rank hashes its own shard; at load both ranks fail together when either shard is damaged."""
    def args(**extra):
        out = ["train", "--config", TINY]
        for item in tiny_overrides(tmp_path / "run", tokenizer_dir, dataset_prefix,
                                   **{"parallel.tp": 2, "train.steps": 4, **extra}):
            out += ["--set", item]
        return out

    assert run_ranks(2, cli_rank, args(**{"train.exit_interval": 2}), timeout=240) == [0, 0]
    path = latest_checkpoint(tmp_path / "run" / "checkpoints")
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert sorted(files) == sorted(p.name for p in path.glob("*.safetensors")) and len(files) == 2
    assert not list(path.glob(f".{MANIFEST}.rank_*"))  # the per-rank parts were merged
    _flip_byte_in_data(path / sorted(files)[1])  # rank 1's shard
    assert run_ranks(2, cli_rank, args(), timeout=240) == [2, 2]
    assert len(read_metrics(tmp_path / "run")) == 2  # nothing trained from the damaged checkpoint
