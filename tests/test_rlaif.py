"""`scaletrain rlaif`: position-debiased preferences by hand, the judge's letter probabilities against
transformers on the exported judge, the output read by `scaletrain dpo`, every layout labelling like one
process (float64), and bad inputs refused up front."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scaletrain.cli import main
from scaletrain.stages.preference.rlaif import JUDGE_TEMPLATE, judge_rows, preferences

from conftest import TINY, tiny_overrides
from dist_harness import cli_rank, run_ranks

pytestmark = pytest.mark.e2e


def test_preferences_average_both_orders():
    # order AB: log p(A) = −1, log p(B) = −2; order BA: log p(A) = −3, log p(B) = −0.5
    p_first, p_a = preferences(torch.tensor([-1.0, -2.0, -3.0, -0.5]))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert p_first.item() == pytest.approx(0.5 * (sig(1.0) + sig(2.5)))
    assert p_a.tolist() == pytest.approx([sig(1.0), sig(-2.5)])
    # a judge that always says A (pure position bias) prefers neither response
    p_first, _ = preferences(torch.tensor([0.0, -9.0, 0.0, -9.0]))
    assert p_first.item() == pytest.approx(0.5)


def test_judge_rows_score_the_letter_after_the_template(tokenizer_dir):
    from scaletrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    rows = judge_rows(tok, "Human: hi", "Which is kinder?", "first reply", "second reply")
    assert len(rows) == 4
    for (ids, start), letter, order in zip(rows, "ABAB", ["first", "first", "second", "second"]):
        assert tok.decode(ids[start:]).strip() == letter
        text = tok.decode(ids[:start])
        assert text.startswith(JUDGE_TEMPLATE.split("{")[0]) and text.index("(A) " + order) > 0


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory, tokenizer_dir, dataset_prefix):
    run = tmp_path_factory.mktemp("rlaif_policy")
    args = ["train", "--config", TINY]
    for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
            "train.seq_length": 384, "train.steps": 10, "checkpoint.export_hf": "hf", "train.global_batch_size": 2,
            "train.micro_batch_size": 1}):
        args += ["--set", s]
    assert main(args) == 0
    return run


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    out = tmp_path_factory.mktemp("rlaif_prompts")
    assert main(["data", "synth", "--output", str(out), "--train", "12", "--test", "4"]) == 0
    return out / "sft_train.jsonl"


def _rlaif(policy, prompts, out, *extra) -> list[str]:
    return ["rlaif", "--policy", str(policy), "--prompts", str(prompts), "--output", str(out), "--limit", "6",
            "--max-new-tokens", "8", "--batch-size", "2", *extra]


def test_labels_match_transformers_and_feed_dpo(tmp_path, policy_run, prompts, tokenizer_dir, dataset_prefix):
    import transformers

    from scaletrain.data.tokenizer import load_tokenizer
    from scaletrain.stages.preference.rlaif import conversation_text

    out = tmp_path / "pairs.jsonl"
    assert main(_rlaif(policy_run, prompts, out, "--judge", str(policy_run / "hf"))) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((tmp_path / "pairs.jsonl.report.json").read_text())
    assert report["pairs"] == len(pairs) and report["pairs"] + sum(report["dropped"].values()) == 6
    assert pairs, report
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(policy_run / "hf"), dtype=torch.float32).eval()
    tok = load_tokenizer(str(policy_run / "hf"))
    for pair in pairs[:3]:
        logps = []
        for ids, start in judge_rows(tok, conversation_text(pair["prompt"]), pair["principle"], pair["chosen"],
                                     pair["rejected"]):
            with torch.no_grad():
                lp = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            logps.append(float(lp[torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])].sum()))
        # judged with the chosen response first: its preference is the one written
        assert preferences(torch.tensor(logps))[0].item() == pytest.approx(pair["preference"], rel=1e-5)
        assert pair["preference"] >= 0.5 and pair["chosen"] != pair["rejected"]
    # The pairs are DPO data as they are.
    run = tmp_path / "dpo"
    args = ["dpo", "--config", TINY]
    for s in tiny_overrides(run, tokenizer_dir, dataset_prefix, **{
            "checkpoint.init_from_hf": str(policy_run / "hf"), "posttrain.chat.train_data": f'["{out}"]',
            "train.seq_length": 384, "train.steps": 2, "train.global_batch_size": 2, "train.micro_batch_size": 1}):
        args += ["--set", s]
    assert main(args) == 0


@pytest.mark.parametrize("layout,world", [(["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"], 4),
                                          ([], 2), (["parallel.cp=2"], 2)], ids=["tp2pp2", "dp2", "cp2"])
def test_every_layout_labels_like_one_process(tmp_path, policy_run, prompts, layout, world):
    common = ["--set", "precision.dtype=float64"]
    assert main(_rlaif(policy_run, prompts, tmp_path / "single.jsonl", *common)) == 0
    args = _rlaif(policy_run, prompts, tmp_path / "par.jsonl", *common, *[x for s in layout for x in ("--set", s)])
    assert run_ranks(world, cli_rank, args, timeout=240) == [0] * world
    single = [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    par = [json.loads(line) for line in (tmp_path / "par.jsonl").read_text().splitlines()]
    assert len(single) == len(par) > 0
    for a, b in zip(single, par):
        assert (a["prompt"], a["chosen"], a["rejected"], a["principle"]) == (b["prompt"], b["chosen"], b["rejected"],
                                                                            b["principle"])
        assert b["preference"] == pytest.approx(a["preference"], rel=1e-9)


def test_bad_inputs_fail_up_front(tmp_path, policy_run, prompts, capsys):
    def err(*extra) -> str:
        assert main(_rlaif(policy_run, prompts, tmp_path / "x.jsonl", *extra)) == 2
        return capsys.readouterr().err

    assert "No such file" in err("--principles", str(tmp_path / "none.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert "holds no principle" in err("--principles", str(empty))
    assert "--temperature > 0" in err("--temperature", "0")
    bad = tmp_path / "judge.txt"
    bad.write_text("{conversation} {verdict}")
    assert "may name only" in err("--judge-template", str(bad))
    assert "reads at most 384 positions" in err("--seq-length", "1024")
    assert not (tmp_path / "x.jsonl").exists()
