"""A new training stage from outside the library — registered here, run through the real `scaletrain`
command — with no edit to the trainer, the run assembly or the CLI (docs/adding-a-stage.md walks through it).

The example: score-weighted SFT. Rows are SFT conversations with a `score`; each conversation's target
tokens count `score` times in the loss (0 leaves a conversation out, 1 is plain SFT on it). With every
score 1 it must be exactly SFT without packing, which the test checks step for step.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.chat.rows import read_rows
from scaletrain.chat.tools import bundled_tools
from scaletrain.cli import build_parser, main
from scaletrain.config.schema import RunConfig
from scaletrain.nn import cross_entropy_per_token
from scaletrain.nn.blockwise_attention import document_mask
from scaletrain.stages.pretrain.stage import step_batches
from scaletrain.stages.registry import register, unregister
from scaletrain.stages.sft.data import SFTDataset
from scaletrain.stages.stage import RunParts, Stage, StageParts
from scaletrain.trainer.contracts import Batch, LossFn, Objective
from scaletrain.trainer.loop import LoopState

from conftest import TINY, read_metrics, tiny_overrides

pytestmark = pytest.mark.e2e


class WeightedSFTObjective(Objective):
    """Σ score · CE over target tokens, normalised by the global number of target tokens."""

    name = "weighted_sft"

    def __init__(self, tp: Any) -> None:
        self.tp = tp  # logits arrive vocabulary-sharded over tp

    def count(self, batch: Batch) -> torch.Tensor:
        return batch["loss_mask"].sum()

    def forward_step(self, batch: Batch, model: torch.nn.Module) -> tuple[torch.Tensor, LossFn]:
        mask = batch["attention_mask"] if "attention_mask" in batch else document_mask(batch["document_ids"])
        logits = model(batch["tokens"], position_ids=batch["position_ids"], attention_mask=mask)

        def loss_fn(output: torch.Tensor):
            per_token = cross_entropy_per_token(output, batch["labels"], self.tp)
            return (per_token * batch["weight"].to(per_token.dtype)).sum(), {}

        return logits, loss_fn


class WeightedSFTStage(Stage):
    name = "weighted_sft"
    help = "SFT with a per-conversation `score` weighting its target tokens (tests/test_stage_plugin.py)"
    sections = ("chat", "sft")  # the [posttrain] sub-sections it reads: chat rows, rendered as SFT's
    data_rows = "`messages` and `score`"

    def validate(self, cfg: RunConfig) -> list[str]:
        return [] if self.settings(cfg).sft.loss_on == "assistant" else ["weighted_sft weights assistant turns only."]

    def render(self, parts: RunParts) -> tuple[Any, Any]:
        s, tok, seq = self.settings(parts.cfg), parts.tokenizer, parts.cfg.train.seq_length
        renderer = ChatRenderer(tok, s.chat.template, s.sft.loss_on, bundled_tools(s.chat.tools))
        rows = []
        for row in read_rows(s.chat.train_data, ("messages", "score")):
            one = SFTDataset([row["messages"]], renderer, tok, seq, packing=False, over_length=s.sft.over_length)
            item = dict(one[0])  # one conversation per row: its score applies to the row's targets
            item["weight"] = float(row["score"]) * item["loss_mask"].to(torch.float64)
            rows.append(item)
        parts.log(f"weighted sft: {len(rows)} conversations")
        return rows, None

    def build(self, parts: RunParts, model: torch.nn.Module, rendered: tuple[Any, Any], state: LoopState) -> StageParts:
        return StageParts(WeightedSFTObjective(parts.dims.tp_comm), step_batches(parts, rendered[0], state))


@pytest.fixture
def weighted_sft():
    stage = register(WeightedSFTStage())
    yield stage
    unregister(stage.name)


def _args(command: str, run_dir, tokenizer_dir, prefix, data, **extra) -> list[str]:
    args = [command, "--config", TINY]
    for s in tiny_overrides(run_dir, tokenizer_dir, prefix, **{
            "posttrain.chat.train_data": f'["{data}"]', "train.seq_length": 160, "train.global_batch_size": 4,
            "train.micro_batch_size": 2, "train.steps": 4, "precision.dtype": "float64", **extra}):
        args += ["--set", s]
    return args


def _scored(tmp_path, scores) -> str:
    assert main(["data", "synth", "--output", str(tmp_path / "synth"), "--train", "16", "--test", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "synth" / "sft_train.jsonl").read_text().splitlines()]
    path = tmp_path / f"scored_{len(set(scores))}.jsonl"
    path.write_text("".join(json.dumps({**r, "score": scores[i % len(scores)]}) + "\n" for i, r in enumerate(rows)))
    return str(path)


def test_a_registered_stage_gets_its_command_and_objective_name(weighted_sft):
    text = build_parser().format_help()
    assert "weighted_sft" in text
    unregister("weighted_sft")
    assert "weighted_sft" not in build_parser().format_help()
    register(weighted_sft)


def test_a_stage_registered_outside_the_library_trains_through_the_cli(tmp_path, tokenizer_dir, dataset_prefix,
                                                                     weighted_sft):
    """Score 1 everywhere: step for step the losses and gradient norms of `scaletrain sft` without packing
    (the same rows, the same order, the same normaliser). Scores 0 and 2 change them."""
    ones = _scored(tmp_path, [1.0])
    assert main(_args("weighted_sft", tmp_path / "w", tokenizer_dir, dataset_prefix, ones)) == 0
    assert main(_args("sft", tmp_path / "s", tokenizer_dir, dataset_prefix, ones, **{"posttrain.sft.packing": False})) == 0
    w, s = read_metrics(tmp_path / "w"), read_metrics(tmp_path / "s")
    assert [m["loss"] for m in w] == [m["loss"] for m in s] and len(w) == 4
    assert [m["grad_norm"] for m in w] == [m["grad_norm"] for m in s]
    assert (tmp_path / "w" / "checkpoints" / "latest").is_file()
    mixed = _scored(tmp_path, [0.0, 2.0])
    assert main(_args("weighted_sft", tmp_path / "m", tokenizer_dir, dataset_prefix, mixed)) == 0
    assert [m["loss"] for m in read_metrics(tmp_path / "m")] != [m["loss"] for m in w]


def test_its_own_rules_are_checked_up_front(tmp_path, tokenizer_dir, dataset_prefix, weighted_sft, capsys):
    args = _args("weighted_sft", tmp_path / "bad", tokenizer_dir, dataset_prefix, _scored(tmp_path, [1.0]),
                 **{"posttrain.sft.loss_on": "all"})
    assert main(args) == 2
    assert "weighted_sft weights assistant turns only." in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
