"""Every bad input of issue 21 §5 gets a message naming the problem, exit code 2 and no traceback.

One row per probe: the command line (built from a few shared fixtures) and a fragment the message must
contain. Rows run in-process through the CLI's
`main(argv)` (the same error path as the installed entry point); SUBPROCESS rows run the real
`python -m scaletrain` to prove that entry point prints no traceback either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scaletrain.cli import main

from conftest import REPO, TINY, tiny_overrides

pytestmark = pytest.mark.e2e


@dataclass
class Env:
    """Shared inputs of the rows: a tokenizer, a dataset, a finished run and its HF export."""

    tmp: Path
    tokenizer: Path
    prefix: str
    run: Path
    hf: Path
    counter: list[int] = field(default_factory=lambda: [0])

    def fresh(self, name: str) -> Path:
        self.counter[0] += 1
        return self.tmp / f"{name}-{self.counter[0]}"

    def train(self, run: Path | None = None, prefix: str | None = None, **sets) -> list[str]:
        args = ["train", "--config", TINY]
        for item in tiny_overrides(run or self.fresh("run"), self.tokenizer, prefix or self.prefix,
                                   **{"train.steps": 2, **sets}):
            args += ["--set", item]
        return args

    def copy_run(self, corrupt: str) -> Path:
        """The finished run with `corrupt` (a file of its checkpoint) replaced by invalid JSON."""
        run = self.fresh("run")
        shutil.copytree(self.run, run)
        ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        (ckpt / corrupt).write_text('{"step": 2,')
        return run

    def copy_hf(self, edit: Callable[[Path], None]) -> Path:
        out = self.fresh("hf")
        shutil.copytree(self.hf, out)
        edit(out)
        return out

    def jsonl(self, name: str, *lines: str) -> str:
        path = self.tmp / name
        path.write_text("".join(line + "\n" for line in lines))
        return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tokenizer_dir, dataset_prefix) -> Env:
    tmp = tmp_path_factory.mktemp("bad_input")
    e = Env(tmp, tokenizer_dir, dataset_prefix, tmp / "done", tmp / "hf")
    assert main(e.train(e.run)) == 0
    assert main(["convert", "to-hf", str(e.run / "checkpoints"), str(e.hf)]) == 0
    return e


def _set_config(key: str, value=None):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _truncated_tokenizer(e: Env) -> str:
    out = e.fresh("tok")
    shutil.copytree(e.tokenizer, out)
    model = out / "tokenizer.model"
    model.write_bytes(model.read_bytes()[:3000])
    return str(model)


def _broken_meta(e: Env) -> str:
    prefix = e.fresh("data") / "d"
    prefix.parent.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(f"{e.prefix}{ext}", f"{prefix}{ext}")
    Path(f"{prefix}.meta.json").write_text('{"tokenizer": ')
    return str(prefix)


NONSTR = ('{"text": "In the beginning God created the heaven and the earth."}', '{"text": 5}')
BADJSON = ('{"text": "In the beginning"}', '{"text": "x"', '{"text": "and the earth"}')
# (id, argv from the shared inputs, fragment of the message)
ROWS: list[tuple[str, Callable[[Env], list[str]], str]] = [
    ("negative num_kv_heads", lambda e: e.train(**{"model.num_kv_heads": -2}),
     "model.num_kv_heads = -2 must be 0 (derive) or positive"),
    ("negative ffn_hidden_size", lambda e: e.train(**{"model.ffn_hidden_size": -64}),
     "model.ffn_hidden_size = -64 must be 0 (derive) or positive"),
    ("negative head_dim", lambda e: e.train(**{"model.head_dim": -16}), "model.head_dim = -16 must be 0 (derive)"),
    ("negative eval_iters", lambda e: e.train(**{"train.eval_iters": -1, "train.eval_interval": 1}),
     "train.eval_iters = -1 must be 0 (off) or positive"),
    ("negative clip_grad", lambda e: e.train(**{"optim.clip_grad": -1}), "optim.clip_grad = -1.0 must be a positive global gradient norm"),
    ("synth --train -5", lambda e: ["data", "synth", "--output", str(e.fresh("synth")), "--train", "-5"],
     "--train -5 --test 500: ask for at least 1 training problem"),
    ("preprocess empty text", lambda e: ["data", "preprocess", "--input", e.jsonl("empty.jsonl", '{"text": ""}'),
                                         "--tokenizer", str(e.tokenizer), "--output-prefix", str(e.fresh("p"))],
     "no non-empty documents in"),
    ("preprocess empty file", lambda e: ["data", "preprocess", "--input", e.jsonl("zero.jsonl"), "--tokenizer",
                                         str(e.tokenizer), "--output-prefix", str(e.fresh("p"))],
     "zero.jsonl are empty (0 bytes)"),
    ("preprocess non-string text", lambda e: ["data", "preprocess", "--input", e.jsonl("ns.jsonl", *NONSTR),
                                              "--tokenizer", str(e.tokenizer), "--output-prefix", str(e.fresh("p"))],
     "ns.jsonl line 2: field 'text' holds a number (5), not a string"),
    ("curate non-string text", lambda e: ["data", "curate", "--input", e.jsonl("ns.jsonl", *NONSTR), "--output",
                                          str(e.tmp / "cur_ns.jsonl"), "--quality", "none"],
     "ns.jsonl line 2: field 'text' holds a number"),
    ("tokenizer non-string text", lambda e: ["data", "tokenizer", "--input", e.jsonl("ns.jsonl", *NONSTR),
                                             "--vocab-size", "300", "--output", str(e.fresh("tok"))],
     "ns.jsonl line 2: field 'text' holds a number"),
    ("preprocess bad JSON line", lambda e: ["data", "preprocess", "--input", e.jsonl("bad.jsonl", *BADJSON),
                                            "--tokenizer", str(e.tokenizer), "--output-prefix", str(e.fresh("p"))],
     "bad.jsonl line 2 is not valid JSON"),
    ("curate bad JSON line", lambda e: ["data", "curate", "--input", e.jsonl("bad.jsonl", *BADJSON), "--output",
                                        str(e.tmp / "cur_bad.jsonl"), "--quality", "none"],
     "bad.jsonl line 2 is not valid JSON"),
    ("tokenizer bad JSON line", lambda e: ["data", "tokenizer", "--input", e.jsonl("bad.jsonl", *BADJSON),
                                           "--vocab-size", "300", "--output", str(e.fresh("tok"))],
     "bad.jsonl line 2 is not valid JSON"),
    ("truncated tokenizer.model", lambda e: ["data", "preprocess", "--input", "builtin:kjv", "--tokenizer",
                                             _truncated_tokenizer(e), "--output-prefix", str(e.fresh("p"))],
     "tokenizer.model is not a readable SentencePiece model"),
    ("tokenizer --vocab-size -5", lambda e: ["data", "tokenizer", "--input", "builtin:kjv", "--vocab-size", "-5",
                                             "--output", str(e.fresh("tok"))], "--vocab-size -5 must be positive"),
    ("tokenizer --vocab-size too small", lambda e: ["data", "tokenizer", "--input", e.jsonl("t.jsonl", NONSTR[0]),
                                                    "--vocab-size", "100", "--output", str(e.fresh("tok"))],
     "--vocab-size 100: SentencePiece cannot train this vocabulary"),
    ("to-hf missing directory", lambda e: ["convert", "to-hf", str(e.tmp / "nowhere"), str(e.fresh("out"))],
     "nowhere does not exist"),
    ("HF config.json missing a key", lambda e: ["convert", "from-hf", str(e.copy_hf(_set_config("hidden_size"))),
                                                str(e.fresh("ck"))], "config.json has no 'hidden_size'"),
    ("HF config.json disagrees with weights", lambda e: [
        "convert", "from-hf", str(e.copy_hf(_set_config("intermediate_size", 96))), str(e.fresh("ck"))],
     "config.json disagrees with the weights beside it"),
    ("HF config.json disagrees (init_from_hf)", lambda e: e.train(**{
        "checkpoint.init_from_hf": e.copy_hf(_set_config("num_key_value_heads", 4))}),
     "config.json disagrees with the weights beside it"),
    ("truncated HF safetensors", lambda e: ["convert", "from-hf", str(e.copy_hf(_truncate)), str(e.fresh("ck"))],
     "model.safetensors cannot be read"),
    ("invalid meta.json", lambda e: e.train(prefix=_broken_meta(e)), "meta.json is not valid JSON"),
    ("invalid trainer_state.json", lambda e: e.train(e.copy_run("trainer_state.json"), **{"train.steps": 3}),
     "trainer_state.json is not valid JSON"),
    ("invalid rank_0.json", lambda e: e.train(e.copy_run("rank_0.json"), **{"train.steps": 3}),
     "rank_0.json is not valid JSON"),
    ("invalid rank_0.json (to-hf)", lambda e: ["convert", "to-hf", str(e.copy_run("rank_0.json") / "checkpoints"),
                                               str(e.fresh("out"))], "rank_0.json is not valid JSON"),
    ("export_hf into a foreign directory", lambda e: e.train(**{"checkpoint.export_hf": str(e.tokenizer)}),
     "checkpoint.export_hf: "),
    ("seq_length beyond memory", lambda e: e.train(**{"train.seq_length": 4_000_000}),
     "needs at least"),
]
SUBPROCESS = {"synth --train -5", "tokenizer --vocab-size -5", "negative num_kv_heads", "seq_length beyond memory"}


@pytest.mark.parametrize("argv,fragment", [pytest.param(a, f, id=i) for i, a, f in ROWS])
def test_bad_input_gets_a_message_and_exit_2(env, argv, fragment, capsys):
    args = argv(env)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "scaletrain: error:" in err and "Traceback" not in err


def test_the_memory_refusal_names_the_estimate_and_the_override(env, capsys):
    assert main(env.train(**{"train.seq_length": 4_000_000})) == 2
    err = capsys.readouterr().err
    assert "GiB per rank by the planner's estimate" in err and "train.seq_length = 4000000" in err
    assert "train.memory_check = false" in err


def test_a_failed_curate_leaves_no_temporary_output(env):
    out = env.tmp / "cur_fail.jsonl"
    # The first row is written before the second fails.
    assert main(["data", "curate", "--input", env.jsonl("nsf.jsonl", *NONSTR), "--output", str(out),
                 "--quality", "none"]) == 2
    assert not list(env.tmp.glob("cur_fail.jsonl*")), list(env.tmp.glob("cur_fail.jsonl*"))


@pytest.mark.parametrize("argv,fragment", [pytest.param(a, f, id=i) for i, a, f in ROWS if i in SUBPROCESS])
def test_the_installed_entry_point_prints_no_traceback(env, argv, fragment):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"),
                                                            os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "scaletrain", *argv(env)], capture_output=True, text=True,
                          env=environ, timeout=300)
    assert done.returncode == 2, done.stderr
    assert fragment in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_memory_check_compares_the_planner_with_the_device_and_can_be_turned_off(monkeypatch):
    from scaletrain.commands.profile import resolved_config
    from scaletrain.profile import memory_check

    cfg = resolved_config(TINY, ["model.vocab_size=512", "train.seq_length=65536", "model.max_position_embeddings=0"], 1)
    need = memory_check.plan(cfg, 1).peak_stage.total_bytes  # CUDA: the planner's bf16 activations
    for have, refused in ((need, False), (int(need / 1.3), True)):
        monkeypatch.setattr(memory_check, "available_memory", lambda *a, h=have: (h, "the memory of GPU 0 (test)"))
        problem = memory_check.memory_problem(cfg, 1, "cuda")
        assert (problem is not None) == refused and (not refused or "the memory of GPU 0 (test)" in problem)
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, memory_check=False))
    assert memory_check.memory_problem(off, 1, "cuda") is None
