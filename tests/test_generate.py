"""`scaletrain generate`: raw prompts continued greedily equal transformers' generate(do_sample=False) on a
tiny model; greedy and seeded sampling give the same rows at tp2·pp2+SP as on one process; stop strings,
finish reasons and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from scaletrain.cli import main
from scaletrain.data.tokenizer import load_tokenizer

from dist_harness import cli_rank, run_ranks

pytestmark = pytest.mark.e2e

transformers = pytest.importorskip("transformers")

PROMPTS = ["In the beginning God created", "And the LORD said unto Moses,", "Blessed are", "And it came to pass",
           "The"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, tokenizer_dir):
    """A random transformers Llama (GQA, 4 layers; shapes nobody tuned for) with the session tokenizer."""
    out = tmp_path_factory.mktemp("gen") / "hf"
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=96,
                                      initializer_range=0.1, bos_token_id=1, eos_token_id=2, rope_theta=5000.0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(out))
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def _prompts(tmp_path, prompts=PROMPTS):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return f


def _generate(model, prompts, out, *extra: str) -> list[dict]:
    assert main(["generate", str(model), "--prompts", str(prompts), "--output", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_greedy_tokens_equal_transformers_generate(tmp_path, tiny_hf):
    rows = _generate(tiny_hf, _prompts(tmp_path), tmp_path / "out.jsonl", "--max-new-tokens", "24", "--batch-size",
                     "2", "--set", "precision.dtype=float64")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf), dtype=torch.float64).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_hf))
    ours = load_tokenizer(tiny_hf)  # (a random model emits byte pieces, which each library spells its own way)
    reasons = set()
    for text, row in zip(PROMPTS, rows):
        ids = tok.encode(text, add_special_tokens=False)
        assert row["prompt"] == text and row["prompt_ids"] == ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids):].tolist()
        assert row["completion_ids"] == ref, (text, row["completion_ids"], ref)
        reasons.add(row["finish_reason"])
        assert row["finish_reason"] == ("eos" if ref[-1] == 2 else "length")
        assert row["completion"] == ours.decode(ref[:-1] if ref[-1] == 2 else ref)
    assert "length" in reasons


def test_every_layout_generates_what_one_process_does(tmp_path, tiny_hf):
    prompts = _prompts(tmp_path)
    for mode in (["--max-new-tokens", "16"], ["--max-new-tokens", "16", "--temperature", "0.9", "--seed", "3"]):
        common = [*mode, "--batch-size", "2", "--set", "precision.dtype=float64"]
        single = _generate(tiny_hf, prompts, tmp_path / "single.jsonl", *common)
        args = ["generate", str(tiny_hf), "--prompts", str(prompts), "--output", str(tmp_path / "par.jsonl"), *common,
                "--set", "parallel.tp=2", "--set", "parallel.pp=2", "--set", "parallel.sequence_parallel=true"]
        assert run_ranks(4, cli_rank, args, timeout=240) == [0] * 4
        par = [json.loads(line) for line in (tmp_path / "par.jsonl").read_text().splitlines()]
        assert par == single and [r["index"] for r in par] == list(range(len(PROMPTS)))
    greedy = _generate(tiny_hf, prompts, tmp_path / "greedy.jsonl", "--max-new-tokens", "16", "--set",
                       "precision.dtype=float64")
    assert [r["completion_ids"] for r in greedy] != [r["completion_ids"] for r in single]  # sampling samples


def test_stop_strings_and_bad_input(tmp_path, tiny_hf, capsys):
    prompts = _prompts(tmp_path)
    full = _generate(tiny_hf, prompts, tmp_path / "full.jsonl", "--max-new-tokens", "16")
    row = next(r for r in full if len(r["completion"]) > 8 and r["finish_reason"] == "length")
    stop = row["completion"][4:7]  # text from inside the continuation
    cut = _generate(tiny_hf, prompts, tmp_path / "cut.jsonl", "--max-new-tokens", "16", "--stop", stop, "--stop",
                    "never-there")[row["index"]]
    assert cut["finish_reason"] == "stop" and cut["stop"] == stop
    assert cut["completion"] == row["completion"][:row["completion"].find(stop)]
    n = len(cut["completion_ids"])  # generation stopped at the token that completed the stop string
    assert cut["completion_ids"] == row["completion_ids"][:n] and n < 16
    assert stop in load_tokenizer(tiny_hf).decode(cut["completion_ids"])
    capsys.readouterr()

    def err(*args: str) -> str:
        assert main(["generate", str(tiny_hf), *args]) == 2
        return capsys.readouterr().err

    assert "does not exist" in err("--prompts", str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert "line 1 has no `prompt`" in err("--prompts", str(bad))
    assert "exceed the model's 96 positions" in err("--prompts", str(prompts), "--max-new-tokens", "90")
    txt = tmp_path / "p.txt"
    txt.write_text("In the beginning\n")
    out = _generate(tiny_hf, txt, tmp_path / "txt.jsonl", "--max-new-tokens", "2", "--add-bos")
    assert out[0]["prompt_ids"][0] == 1 and len(out) == 1
