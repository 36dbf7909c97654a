"""DPO through the real entry point: reference log-probs computed once and reused on resume, the loss at
tp2·pp2 and dp2 equal to the single-process run (float64), and every loss type trains."""

from __future__ import annotations

import json

import pytest

from scaletrain.cli import main

from conftest import TINY, read_metrics, tiny_overrides
from parity import assert_same_steps, run_single_and_parallel

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(out), "--train", "24", "--test", "4"]) == 0
    return out / "dpo_train.jsonl"


def _args(run_dir, tokenizer_dir, prefix, pairs, **extra):
    args = ["dpo", "--config", TINY]
    for s in tiny_overrides(run_dir, tokenizer_dir, prefix, **{
            "posttrain.chat.train_data": f'["{pairs}"]', "train.seq_length": 160, "model.num_layers": 4,
            "train.global_batch_size": 4, "train.micro_batch_size": 1, "train.steps": 3, "precision.dtype": "float64",
            "posttrain.dpo.beta": 0.5, **extra}):
        args += ["--set", s]
    return args


@pytest.mark.parametrize("layout,world", [({"parallel.tp": 2, "parallel.pp": 2}, 4), ({}, 2),
                                          ({"parallel.cp": 2, "parallel.pp": 2}, 4)], ids=["tp2pp2", "dp2", "cp2pp2"])
def test_dpo_losses_match_single_process_across_layouts(tmp_path, tokenizer_dir, dataset_prefix, pairs, layout, world):
    single, parallel = tmp_path / "False", tmp_path / "True"
    valid = {"posttrain.chat.valid_data": f'["{pairs.with_name("dpo_test.jsonl")}"]', "train.eval_interval": 3,
             "train.eval_iters": 1}
    a, b = run_single_and_parallel(
        lambda par: (tmp_path / str(par), _args(tmp_path / str(par), tokenizer_dir, dataset_prefix, pairs,
                                                **valid, **(layout if par else {}))), world)
    assert len(a) == 3
    assert a[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-12)  # policy = reference at step 1: ln 2
    assert a[0]["rewards_margin"] == a[0]["rewards_accuracy"] == 0.0  # no margin yet, so no pair is won
    assert_same_steps(a, b, 1e-10)
    # The objective's metrics reach metrics.jsonl, means over the global batch's pairs, equal at every layout.
    keys = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")
    for x, y in zip(a, b):
        assert x["rewards_margin"] == pytest.approx(x["rewards_chosen"] - x["rewards_rejected"], abs=1e-12)
        assert x["rewards_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 pairs per step
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), (x["step"], k)
    assert a[1]["rewards_margin"] != 0.0
    assert a[2]["val_loss"] == pytest.approx(b[2]["val_loss"], rel=1e-10)
    for k in keys:
        assert a[2][f"val_{k}"] == pytest.approx(b[2][f"val_{k}"], rel=1e-9, abs=1e-12)
    ref_a = json.loads((single / "reference_logps.json").read_text())
    ref_b = json.loads((parallel / "reference_logps.json").read_text())
    assert ref_a.keys() == ref_b.keys() and len(ref_a) == 24 + 4  # training and validation pairs
    for k in ref_a:
        assert ref_a[k] == pytest.approx(ref_b[k], rel=1e-12)


def test_resume_reuses_the_reference_of_the_first_start(tmp_path, tokenizer_dir, dataset_prefix, pairs, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(_args(straight, tokenizer_dir, dataset_prefix, pairs, **{"train.steps": 4})) == 0
    assert main(_args(stopped, tokenizer_dir, dataset_prefix, pairs, **{"train.steps": 4, "train.exit_interval": 2})) == 0
    assert main(_args(stopped, tokenizer_dir, dataset_prefix, pairs, **{"train.steps": 4})) == 0
    assert "pairs read from" in capsys.readouterr().out
    assert [m["loss"] for m in read_metrics(stopped)] == [m["loss"] for m in read_metrics(straight)]
    (stopped / "reference_logps.json").unlink()
    assert main(_args(stopped, tokenizer_dir, dataset_prefix, pairs, **{"train.steps": 6})) == 2
    assert "a resumed DPO run needs the reference log-probs" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["ipo", "hinge", "simpo"])
def test_every_loss_type_trains(tmp_path, tokenizer_dir, dataset_prefix, pairs, loss):
    assert main(_args(tmp_path / "r", tokenizer_dir, dataset_prefix, pairs,
                      **{"posttrain.dpo.loss_type": loss, "precision.dtype": "float32", "train.steps": 4})) == 0
    losses = [m["loss"] for m in read_metrics(tmp_path / "r")]
    assert len(losses) == 4 and all(x == x for x in losses)  # finite
    assert (tmp_path / "r" / "reference_logps.json").exists() == (loss != "simpo")


def test_nll_weight_adds_the_chosen_mean_token_nll(tokenizer_dir):
    import torch

    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.config.schema import ModelConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.data.tokenizer import load_tokenizer
    from scaletrain.models import build_model
    from scaletrain.nn import cross_entropy_per_token, init_parameters
    from scaletrain.stages.preference.data import PreferenceDataset
    from scaletrain.stages.preference.dpo import DPOObjective

    tok = load_tokenizer(str(tokenizer_dir))
    ds = PreferenceDataset([{"prompt": "1+1?", "chosen": "2", "rejected": "3"},
                            {"prompt": "2+2?", "chosen": "4", "rejected": "5"}], ChatRenderer(tok, "chatml"), tok, 64)
    m = resolve_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                                  vocab_size=512), tokenizer_vocab=None, tp=1, seq_length=64)
    model = build_model(m, dtype=torch.float64)
    init_parameters(model, 1, tp_rank=0, tp_size=1)
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ds[0]}
    losses = []
    for w in (0.0, 0.3):
        obj = DPOObjective(None, "simpo", 2.0, nll_weight=w)
        b = obj.prepare(batch)
        out, loss_fn = obj.forward_step(b, model)
        losses.append(loss_fn(out)[0])
    per_token = cross_entropy_per_token(model(batch["chosen_tokens"]), batch["chosen_labels"])
    mask = batch["chosen_mask"].double()
    nll = ((per_token * mask).sum(-1) / mask.sum(-1)).sum()
    assert float((losses[1] - losses[0]).detach()) == pytest.approx(0.3 * float(nll.detach()), rel=1e-10)
