"""Pretraining datasets through megatron.core: GPTDataset splits and weighted blends.

megatron.core is imported here only (it costs seconds per process), and only the datasets part.
Samples are fixed-length windows of `seq_length + 1` tokens over the concatenated documents,
shuffled deterministically from the seed; sample i of a split is always the same sample, so a
run resumes exactly from its consumed-sample count.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from scaletrain.config.schema import DataConfig
from scaletrain.config.validate import parse_split
from scaletrain.data.indexed import (
    DatasetError,
    check_indexed_dataset,
    check_vocab,
    document_count,
    file_stamp,
)


@dataclass
class _MegatronTokenizerView:
    """The few tokenizer facts megatron.core's GPTDataset reads (it never tokenizes)."""

    vocab_size: int
    eod: int
    files: dict[str, list[int]] | None = None  # prefix → .idx and .bin size and mtime

    @property
    def unique_identifiers(self) -> dict:  # part of Megatron's dataset cache key
        # Megatron keys PREFIX/cache/ by path, split, seed and length, not by content: a dataset
        # re-preprocessed to the same prefix would reuse indices of the old one (an IndexError, or
        # samples from the wrong documents). The files' stamps make a rewritten dataset a new key.
        return {"class": "scaletrain", "vocab_size": self.vocab_size, "eod": self.eod, "files": self.files}


def check_data(cfg: DataConfig, *, model_vocab: int, tokenizer_vocab: int, tokenizer_sha256: str | None) -> list[int]:
    """Validate every prefix (files, structure, vocabulary) before anything heavy; return token counts."""
    counts = []
    for prefix in cfg.prefixes:
        info = check_indexed_dataset(prefix)
        check_vocab(info, model_vocab=model_vocab, tokenizer_vocab=tokenizer_vocab, tokenizer_sha256=tokenizer_sha256)
        counts.append(info.tokens)
    return counts


def build_gpt_datasets(cfg: DataConfig, *, seq_length: int, seed: int, eod_id: int, vocab_size: int,
                       train_samples: int, valid_samples: int):
    """(train, valid) map-style datasets of dicts with `tokens`, `labels`, `loss_mask`, `position_ids`.

    valid is None when data.split gives validation no share or valid_samples is 0.
    """
    # Megatron warns about absent TE/apex when its package initialises; irrelevant to datasets.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)

    weights = list(cfg.weights) if cfg.weights else None
    split = parse_split(cfg.split)
    gpt_cfg = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(cfg.prefixes), weights),
        split=",".join(f"{s:.6f}" for s in split),
        tokenizer=_MegatronTokenizerView(vocab_size, eod_id, {  # type: ignore[arg-type]
            p: file_stamp(f"{p}.idx") + file_stamp(f"{p}.bin") for p in cfg.prefixes}),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=None,
    )
    valid_n = valid_samples if split[1] > 0 else 0
    _check_split_documents(cfg, split)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, valid_n, 0],
                                            lambda: True, gpt_cfg)
    train, valid, _test = builder.build()
    if train is None or len(train) == 0:
        raise ValueError("the training split is empty: give data.split a non-zero first part and data that "
                         f"holds at least one sequence of {seq_length + 1} tokens.")
    return train, (valid if valid_n else None)


def _check_split_documents(cfg: DataConfig, split: list[float]) -> None:
    """Refuse a split that gives a part with a non-zero share no documents of some dataset: Megatron
    builds that part anyway and loops forever looking for its first sample."""
    bounds = [0.0, split[0], split[0] + split[1], 1.0]
    names = ("training", "validation", "test")
    for prefix in cfg.prefixes:
        n = document_count(prefix)
        # Megatron's rule (BlendedMegatronDatasetBuilder): documents [round(lo·n), round(hi·n)) per part.
        for i, name in enumerate(names):
            if split[i] > 0 and int(round(bounds[i + 1] * n)) == int(round(bounds[i] * n)):
                raise DatasetError(
                    f"data.split = {cfg.split!r} gives dataset {prefix} ({n} documents) no {name} documents; give "
                    + ("it more documents." if i == 0 else
                       f"the {name} part a larger share, or none (e.g. data.split = '100,0,0': no validation)."))
