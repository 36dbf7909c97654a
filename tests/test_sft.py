"""SFT: assistant-only loss masks, bad rows counted, and the SFT loss at tp2·pp2 and dp2 equal to the
single-process run (float64) through the real entry point."""

from __future__ import annotations

import json

import pytest
import torch

from scaletrain.chat.renderer import BadConversation, ChatRenderer
from scaletrain.cli import main
from scaletrain.data.tokenizer import load_tokenizer
from scaletrain.stages.sft.data import SFTDataset

from conftest import TINY, tiny_overrides
from parity import assert_same_steps, run_single_and_parallel

pytestmark = pytest.mark.e2e

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two and two?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three?"},
        {"role": "assistant", "tool_calls": [{"name": "calculator", "arguments": {"expr": "2+3"}}]},
        {"role": "tool", "content": "5"}, {"role": "assistant", "content": "Five."}]


def test_loss_mask_covers_assistant_turns_only(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    r = ChatRenderer(tok, "chatml")
    ids, mask = r.render(CONV)
    assert len(ids) == len(mask) and tok.decode(ids) == r.text(CONV)
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    assert target == ('Four.<|im_end|>\n<tool_call>{"name": "calculator", "arguments": {"expr": "2+3"}}</tool_call>'
                      '<|im_end|>\nFive.<|im_end|>\n')
    _, all_mask = ChatRenderer(tok, "chatml", loss_on="all").render(CONV)
    assert all(all_mask)
    assert r.prompt_ids(CONV[:2]) == tok.encode(r.text(CONV[:2]) + "<|im_start|>assistant\n")


def test_bad_rows_are_counted_not_repaired(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    r = ChatRenderer(tok, "chatml")
    for bad, reason in [([{"role": "user", "content": "hi"}], "no assistant turn"),
                        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "empty assistant"),
                        ([{"role": "robot", "content": "hi"}], "unknown role")]:
        with pytest.raises(BadConversation, match=reason):
            r.render(bad)
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    ds = SFTDataset([good, good, [{"role": "user", "content": "x"}], long], r, tok, 128)
    assert ds.report.used == 2 and ds.report.dropped == {"no assistant turn": 1, "longer than train.seq_length": 1}
    assert len(ds) == 1  # both good conversations packed into one row
    row = ds[0]
    assert row["document_ids"].max() == 1 and row["position_ids"].tolist().count(0) >= 2
    truncated = SFTDataset([long], ChatRenderer(tok, "chatml", loss_on="all"), tok, 64, over_length="truncate")
    assert truncated.report.truncated == 1 and len(truncated) == 1


def _sft_args(run_dir, tokenizer_dir, prefix, data_file, **extra):
    args = ["sft", "--config", TINY]
    for s in tiny_overrides(run_dir, tokenizer_dir, prefix, **{
            "posttrain.chat.train_data": f'["{data_file}"]', "train.seq_length": 160, "model.num_layers": 4,
            "train.global_batch_size": 4, "train.micro_batch_size": 1, "train.steps": 3, "precision.dtype": "float64",
            **extra}):
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(out), "--train", "40", "--test", "5"]) == 0
    return out / "sft_train.jsonl"


@pytest.mark.parametrize("layout,world", [({"parallel.tp": 2, "parallel.pp": 2}, 4), ({}, 2)])
def test_sft_losses_match_single_process_across_layouts(tmp_path, tokenizer_dir, dataset_prefix, sft_file,
                                                       layout, world):
    a, b = run_single_and_parallel(
        lambda par: (tmp_path / str(par), _sft_args(tmp_path / str(par), tokenizer_dir, dataset_prefix, sft_file,
                                                    **{"checkpoint.export_hf": "hf"}, **(layout if par else {}))), world)
    assert len(a) == 3
    assert_same_steps(a, b, 1e-10)
    # Each run exported its final model (checkpoint.export_hf); the sharded run's export equals the single one's.
    from safetensors.torch import load_file

    single, sharded = (load_file(str(tmp_path / str(par) / "hf" / "model.safetensors")) for par in (False, True))
    assert single.keys() == sharded.keys()
    for k in single:
        assert torch.allclose(single[k], sharded[k], rtol=1e-9, atol=1e-12), k
    assert [x["loss_tokens"] for x in a] == [y["loss_tokens"] for y in b]
    rows = [json.loads(line) for line in sft_file.read_text().splitlines()]
    assert a[0]["loss_tokens"] > 0 and len(rows) == 40
