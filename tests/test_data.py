"""Tokenizer, preprocessing into Megatron format, up-front dataset checks, blending."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from scaletrain.config.schema import DataConfig
from scaletrain.data.gpt import build_gpt_datasets, check_data
from scaletrain.data.indexed import DatasetError, check_indexed_dataset
from scaletrain.data.preprocess import preprocess
from scaletrain.data.tokenizer import load_tokenizer

from conftest import corpus_texts

pytestmark = pytest.mark.unit


def _megatron_indexed(prefix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix)


def test_written_dataset_reads_back_identically_through_megatron(dataset_prefix, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    texts = corpus_texts()
    ds = _megatron_indexed(dataset_prefix)
    assert len(ds) == len(texts)
    for i in (0, 1, 500, len(texts) - 1):
        expected = tok.encode(texts[i]) + [tok.eos_id]
        assert ds[i].tolist() == expected
    info = check_indexed_dataset(dataset_prefix)
    assert info.documents == len(texts) and info.dtype == np.uint16
    assert info.meta["tokenizer_vocab_size"] == 512


def test_transformers_loads_the_trained_tokenizer_with_identical_ids(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(tokenizer_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    samples = corpus_texts(40) + ["  two  leading spaces", "tabs\tand\nnewlines\n\n", "ünïcödé ☃ 漢字 123456"]
    for text in samples:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
        assert ours.decode(ours.encode(text)) == text  # byte fallback: lossless
    assert hf.eos_token_id == ours.eos_id


def test_parallel_workers_write_the_same_bytes(tmp_path, tokenizer_dir, dataset_prefix):
    from scaletrain.data.preprocess import BUILTIN_CORPUS

    out = tmp_path / "kjv2"
    stats = preprocess([str(BUILTIN_CORPUS)], str(tokenizer_dir), str(out), workers=2)
    assert stats.tokens > 0 and stats.tokens_per_s > 0
    assert (tmp_path / "kjv2.bin").read_bytes() == open(f"{dataset_prefix}.bin", "rb").read()
    assert (tmp_path / "kjv2.idx").read_bytes() == open(f"{dataset_prefix}.idx", "rb").read()


def test_jsonl_with_other_text_key_and_missing_key(tmp_path, tokenizer_dir):
    src = tmp_path / "in.jsonl"
    src.write_text('{"body": "In the beginning"}\n{"body": ""}\n{"body": "was the word"}\n')
    stats = preprocess([str(src)], str(tokenizer_dir), str(tmp_path / "x"), text_key="body")
    assert stats.documents == 2 and stats.skipped_empty == 1
    with pytest.raises(KeyError, match="no 'text' field.*body.*--text-key"):
        preprocess([str(src)], str(tokenizer_dir), str(tmp_path / "y"))


def _copy_dataset(prefix, dst):
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{prefix}{ext}", f"{dst}{ext}")
    return str(dst)


@pytest.mark.parametrize("damage", ["truncate_idx", "bad_header", "truncate_bin", "missing_bin"])
def test_corrupt_dataset_fails_fast_naming_file_and_fix(tmp_path, dataset_prefix, damage):
    prefix = _copy_dataset(dataset_prefix, tmp_path / "d")
    idx, bin_ = tmp_path / "d.idx", tmp_path / "d.bin"
    if damage == "truncate_idx":
        idx.write_bytes(idx.read_bytes()[:-100])
    elif damage == "bad_header":
        idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    elif damage == "truncate_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    else:
        bin_.unlink()
    with pytest.raises(DatasetError) as e:
        check_indexed_dataset(prefix)
    assert "d." in str(e.value) and "scaletrain data preprocess" in str(e.value)


def test_vocab_mismatches_fail_fast(dataset_prefix):
    cfg = DataConfig(prefixes=(dataset_prefix,))
    check_data(cfg, model_vocab=512, tokenizer_vocab=512, tokenizer_sha256=None)
    with pytest.raises(DatasetError, match="tokenized with a 512-token tokenizer.*has 1000 tokens"):
        check_data(cfg, model_vocab=1024, tokenizer_vocab=1000, tokenizer_sha256=None)
    with pytest.raises(DatasetError, match="different tokenizer"):
        check_data(cfg, model_vocab=512, tokenizer_vocab=512, tokenizer_sha256="0" * 64)
    with pytest.raises(DatasetError, match="contains token id .* model.vocab_size is 256"):
        check_data(cfg, model_vocab=256, tokenizer_vocab=512, tokenizer_sha256=None)


def test_vocab_check_scans_foreign_data_without_sidecar(tmp_path, dataset_prefix):
    prefix = _copy_dataset(dataset_prefix, tmp_path / "m")
    (tmp_path / "m.meta.json").unlink()  # as data written by Megatron itself
    with pytest.raises(DatasetError, match="contains token id 511"):
        check_data(DataConfig(prefixes=(prefix,)), model_vocab=300, tokenizer_vocab=512, tokenizer_sha256=None)


def _constant_dataset(tmp_path, name, token, tokenizer_dir):
    src = tmp_path / f"{name}.txt"
    word = load_tokenizer(tokenizer_dir).decode([token])
    src.write_text("\n".join([word * 50] * 200) + "\n")
    preprocess([str(src)], str(tokenizer_dir), str(tmp_path / name), append_eod=False)
    return str(tmp_path / name)


def test_blend_respects_weights(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    a_tok, b_tok = tok.encode("the")[0], tok.encode("LORD")[0]
    a = _constant_dataset(tmp_path, "a", a_tok, tokenizer_dir)
    b = _constant_dataset(tmp_path, "b", b_tok, tokenizer_dir)
    n = 2000
    train, _ = build_gpt_datasets(DataConfig(prefixes=(a, b), weights=(0.3, 0.7), split="100,0,0"),
                                  seq_length=16, seed=5, eod_id=tok.eos_id, vocab_size=512,
                                  train_samples=n, valid_samples=0)
    from_a = sum(int((train[i]["tokens"] == a_tok).all()) for i in range(n))
    from_b = sum(int((train[i]["tokens"] == b_tok).all()) for i in range(n))
    assert from_a + from_b == n
    # Megatron blends deterministically by error feedback: the fraction tracks the weight closely.
    assert abs(from_a / n - 0.3) < 3 * (0.3 * 0.7 / n) ** 0.5


def test_order_is_deterministic_and_seeded(dataset_prefix):
    kw = dict(seq_length=32, eod_id=2, vocab_size=512, train_samples=64, valid_samples=8)
    cfg = DataConfig(prefixes=(dataset_prefix,))
    t1, v1 = build_gpt_datasets(cfg, seed=1, **kw)
    t2, _ = build_gpt_datasets(cfg, seed=1, **kw)
    t3, _ = build_gpt_datasets(cfg, seed=2, **kw)
    assert all((t1[i]["tokens"] == t2[i]["tokens"]).all() for i in range(64))
    assert not all((t1[i]["tokens"] == t3[i]["tokens"]).all() for i in range(8))
    assert v1 is not None and len(v1) > 0
    assert (t1[0]["labels"][:-1] == t1[0]["tokens"][1:]).all()


def test_hf_tokenizer_json_works_end_to_end(tmp_path):
    """A byte-level BPE tokenizer.json (as Llama 3 / Qwen ship) drives preprocessing like SentencePiece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_texts(100), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|end_of_text|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tok")
    assert ours.eos_id == tok.token_to_id("<|end_of_text|>") and ours.vocab_size == tok.get_vocab_size()
    text = corpus_texts(1)[0]
    assert ours.decode(ours.encode(text)) == text
    src = tmp_path / "c.txt"
    src.write_text("In the beginning\nGod created\n")
    stats = preprocess([str(src)], str(tmp_path / "tok"), str(tmp_path / "c"))
    assert stats.documents == 2
    ds = _megatron_indexed(str(tmp_path / "c"))  # keep it alive: its items are views of its mmap
    assert ds[0].tolist() == ours.encode("In the beginning") + [ours.eos_id]
