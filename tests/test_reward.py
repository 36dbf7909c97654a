"""Reward models through the real entry point: the Bradley–Terry loss by hand, the score read at the
conversation's last token, the loss at tp2·pp2+SP and dp2 equal to the single process (float64), the
export loading as transformers' LlamaForSequenceClassification with equal scores, a start from a
causal LM's HF export, and bad configs refused up front."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scaletrain.cli import main
from scaletrain.distributed import ParallelDims
from scaletrain.stages.preference.reward_model import bradley_terry, last_token_index

from conftest import TINY, read_metrics, tiny_overrides
from parity import assert_same_steps, run_single_and_parallel

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(out), "--train", "24", "--test", "4"]) == 0
    return out / "dpo_train.jsonl"


def _args(run_dir, tokenizer_dir, prefix, pairs, **extra):
    args = ["reward", "--config", TINY]
    for s in tiny_overrides(run_dir, tokenizer_dir, prefix, **{
            "posttrain.chat.train_data": f'["{pairs}"]', "train.seq_length": 160, "model.num_layers": 4,
            "train.global_batch_size": 4, "train.micro_batch_size": 1, "train.steps": 3, "precision.dtype": "float64",
            **extra}):
        args += ["--set", s]
    return args


def test_bradley_terry_by_hand():
    c, r = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    losses, m = bradley_terry(c, r)
    want = [math.log1p(math.exp(-(a - b))) for a, b in zip(c.tolist(), r.tolist())]
    assert losses.tolist() == pytest.approx(want, abs=1e-15)
    assert m["rewards_accuracy"].tolist() == [1.0, 0.0, 0.0] and m["rewards_margin"].tolist() == [1.0, -1.0, 0.0]
    losses, _ = bradley_terry(c, r, margin=0.5, center=0.1)
    assert losses[0].item() == pytest.approx(math.log1p(math.exp(-0.5)) + 0.1 * 1.0, abs=1e-15)


def test_score_is_read_at_the_last_rendered_token(tokenizer_dir):
    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.data.tokenizer import load_tokenizer
    from scaletrain.stages.preference.data import PreferenceDataset

    tok = load_tokenizer(str(tokenizer_dir))
    renderer = ChatRenderer(tok, "chatml")
    pair = {"prompt": "Two and two?", "chosen": "Four.", "rejected": "Five, surely."}
    item = PreferenceDataset([pair], renderer, tok, 64)[0]
    for side, text in (("chosen", "Four."), ("rejected", "Five, surely.")):
        ids, _ = renderer.render([{"role": "user", "content": "Two and two?"}, {"role": "assistant", "content": text}])
        i = int(last_token_index(item[f"{side}_mask"][None])[0])
        assert i == len(ids) - 1 and item[f"{side}_tokens"][i].item() == ids[-1]  # the end-of-turn marker's last token


@pytest.mark.parametrize("layout,world,tied", [
    ({"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}, 4, False), ({}, 2, False),
    ({"parallel.pp": 2}, 2, True),  # a tied embedding needs no copy on the last stage: the score head is there
    ({"parallel.cp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True}, 4, False)])
def test_reward_losses_match_single_process_across_layouts(tmp_path, tokenizer_dir, dataset_prefix, pairs, layout,
                                                          world, tied):
    valid = {"posttrain.chat.valid_data": f'["{pairs.with_name("dpo_test.jsonl")}"]', "train.eval_interval": 3,
             "train.eval_iters": 1, "posttrain.reward.center_coefficient": 0.01, "model.tie_embeddings": tied}
    a, b = run_single_and_parallel(
        lambda par: (tmp_path / str(par), _args(tmp_path / str(par), tokenizer_dir, dataset_prefix, pairs,
                                                **valid, **(layout if par else {}))), world)
    assert len(a) == 3
    assert_same_steps(a, b, 1e-10)
    keys = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")
    for x, y in zip(a, b):
        assert x["rewards_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), (x["step"], k)
    assert a[2]["val_loss"] == pytest.approx(b[2]["val_loss"], rel=1e-10)
    assert a[2]["val_rewards_accuracy"] == b[2]["val_rewards_accuracy"]


def test_export_scores_like_transformers_sequence_classification(tmp_path, tokenizer_dir, dataset_prefix, pairs,
                                                                 monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "rm"
    assert main(_args(run, tokenizer_dir, dataset_prefix, pairs, **{"checkpoint.export_hf": "hf"})) == 0
    config = json.loads((run / "hf" / "config.json").read_text())  # checkpoint.export_hf: float32
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert main(["convert", "to-hf", str(run / "checkpoints"), str(run / "hf64"), "--dtype", "float64"]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run / "hf64", torch_dtype=torch.float64).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"

    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.checkpoint import latest_checkpoint
    from scaletrain.checkpoint.hf import load_full_model
    from scaletrain.data.tokenizer import load_tokenizer

    from hf_helpers import patch_hf_float64

    _, ours = load_full_model(latest_checkpoint(run / "checkpoints"), torch.float64)
    hf.config._attn_implementation = "eager"
    patch_hf_float64(monkeypatch, hf, ours)  # transformers' float32 islands (RMSNorm, RoPE, softmax) in float64
    renderer = ChatRenderer(load_tokenizer(str(run / "hf")), "chatml")
    for row in [json.loads(line) for line in pairs.read_text().splitlines()[:3]]:
        ids, _ = renderer.render([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}])
        x = torch.tensor([ids])
        with torch.no_grad():
            want = hf(input_ids=x).logits[0, 0].item()  # pooled at the last non-padding token
            got = ours.eval()(x)[0, -1, 0].item()
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    # And back: the HF reward model imports into a checkpoint with its score head.
    assert main(["convert", "from-hf", str(run / "hf"), str(tmp_path / "back")]) == 0
    # A reward model cannot chat: refused by name.
    assert main(["chat", str(run / "hf"), "--message", "Hi"]) == 2
    assert "is a reward model" in capsys.readouterr().err


def test_reward_model_starts_from_a_causal_lm_export(tmp_path, tokenizer_dir, dataset_prefix, pairs, capsys):
    lm = tmp_path / "lm"
    args = ["train", "--config", TINY]
    for s in tiny_overrides(lm, tokenizer_dir, dataset_prefix, **{"train.steps": 2, "checkpoint.export_hf": "hf"}):
        args += ["--set", s]
    assert main(args) == 0
    run = tmp_path / "rm"
    rm_args = _args(run, tokenizer_dir, dataset_prefix, pairs, **{"checkpoint.init_from_hf": str(lm / "hf"),
                                                                  "model.max_position_embeddings": 160,
                                                                  "precision.dtype": "float32"})
    assert main(rm_args) == 0
    assert "score.weight newly initialised: the HF model is a causal LM" in capsys.readouterr().out
    from safetensors.torch import load_file

    from scaletrain.checkpoint import latest_checkpoint
    from scaletrain.checkpoint.hf import checkpoint_model_config

    assert checkpoint_model_config(latest_checkpoint(run / "checkpoints")).num_labels == 1
    body = load_file(str(lm / "hf" / "model.safetensors"))
    assert "lm_head.weight" in body and len(read_metrics(run)) == 3


@pytest.mark.parametrize("extra,message", [
    ({"posttrain.objective": "reward", "model.num_labels": 2}, "scores one number per conversation"),
    ({"posttrain.objective": "sft", "model.num_labels": 1}, "no token logits"),
])
def test_bad_reward_configs_exit_before_training(tmp_path, tokenizer_dir, dataset_prefix, pairs, capsys, extra, message):
    args = ["train", "--config", TINY]
    for s in tiny_overrides(tmp_path / "run", tokenizer_dir, dataset_prefix,
                            **{"posttrain.chat.train_data": f'["{pairs}"]', **extra}):
        args += ["--set", s]
    assert main(args) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------- RLHF: GRPO on a reward model

def test_scorer_reads_each_row_alone_despite_left_padding():
    """A batch of different-length rows, left-padded into microbatches, scores each row as it would
    alone (padding is its own document); a trailing eos is dropped before scoring."""
    from scaletrain.config.schema import ModelConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters
    from scaletrain.stages.rl.reward_model_scorer import RewardModelScorer
    from scaletrain.trainer.precision import Precision

    m = resolve_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                                  vocab_size=64, num_labels=1), tokenizer_vocab=None, tp=1, seq_length=32)
    model = build_model(m, tp_size=1, dtype=torch.float64)
    init_parameters(model, 5, tp_rank=0, tp_size=1)
    scorer = RewardModelScorer(model, ParallelDims.single(), pad_id=0, eos_id=2, micro_batch=2,
                               precision=Precision(torch.float64, None, "cpu", "test"), device=torch.device("cpu"))
    prompts, completions = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[20, 21, 2], [22], [23, 24]]
    got = scorer(prompts, completions)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = p + [t for t in c if t != 2]
        with torch.no_grad():
            assert got[i].item() == pytest.approx(model(torch.tensor([row]))[0, -1, 0].item(), rel=1e-12)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tokenizer_dir, dataset_prefix, pairs):
    rm = tmp_path_factory.mktemp("rm")
    assert main(_args(rm, tokenizer_dir, dataset_prefix, pairs, **{"train.seq_length": 96, "train.steps": 2})) == 0
    return rm


@pytest.mark.parametrize("layout", [{"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True},
                                    {"parallel.cp": 2, "parallel.pp": 2}], ids=["tp2pp2sp", "cp2pp2"])
def test_grpo_on_a_reward_model_matches_single_process(tmp_path, tokenizer_dir, dataset_prefix, pairs, reward_run,
                                                       layout):
    """RLHF: a reward model trained by `scaletrain reward`, then GRPO scored by it, at tp2·pp2+SP and cp2·pp2
    equal to the single process — the reward model runs in the policy's layout (under cp: each cp rank
    scores a share of the completions on whole rows)."""
    rm = reward_run
    prompts = pairs.with_name("sft_train.jsonl")

    def grpo(par: bool):
        run = tmp_path / f"grpo{par}"
        args = ["grpo", "--config", TINY]
        for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
                "posttrain.chat.train_data": f'["{prompts}"]', "train.seq_length": 96, "model.num_layers": 4,
                "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.steps": 2,
                "precision.dtype": "float64", "posttrain.grpo.group_size": 4, "posttrain.rollout.max_new_tokens": 6,
                "posttrain.rewards.functions": '["reward_model"]', "posttrain.rewards.model": str(rm),
                **(layout if par else {})}):
            args += ["--set", s]
        return run, args

    a, b = run_single_and_parallel(grpo, 4)
    assert len(a) == 2 and a[0]["reward_std"] > 0 and all(x["grad_norm"] > 0 for x in a)
    assert_same_steps(a, b, 1e-10, loss_abs=1e-15)  # the on-policy loss is −mean(A)·1 ≈ 0 (rounding)
    for x, y in zip(a, b):
        for k in ("reward", "reward_reward_model", "reward_std"):
            assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12), (x["step"], k)


def test_bad_reward_model_settings_exit_before_training(tmp_path, tokenizer_dir, dataset_prefix, pairs, capsys):
    lm = tmp_path / "lm"
    args = ["train", "--config", TINY]
    for s in tiny_overrides(lm, tokenizer_dir, dataset_prefix, **{"train.steps": 2}):
        args += ["--set", s]
    assert main(args) == 0
    prompts = pairs.with_name("sft_train.jsonl")
    for extra, message in [({"posttrain.rewards.functions": '["reward_model"]'}, "posttrain.rewards.model is empty"),
                           ({"posttrain.rewards.functions": '["reward_model"]', "posttrain.rewards.model": str(lm)},
                            "no score head (a language model)"),
                           ({"posttrain.rewards.functions": '["reward_model"]', "posttrain.rewards.model": str(tmp_path / "nope")},
                            "neither a Hugging Face directory")]:
        args = ["grpo", "--config", TINY]
        for s in tiny_overrides(tmp_path / "run", tokenizer_dir, dataset_prefix, **{
                "posttrain.chat.train_data": f'["{prompts}"]', "posttrain.grpo.group_size": 4, "posttrain.rollout.max_new_tokens": 8,
                **extra}):
            args += ["--set", s]
        assert main(args) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
