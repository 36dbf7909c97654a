"""One decoding engine: every generation caller — `generate_turn` (chat, the tool loop), `greedy_generate`,
`exact_match`, `scaletrain chat` and `scaletrain eval`'s answers — decodes through the KV-cache sampler
(generation/sampler.py) and gets, greedily, the very tokens of the old decoder that recomputed every prefix
(tests/reference_generate.py), in one process and at tp2·pp2 with sequence parallelism. Float64 models, so
a near-tie cannot flip an argmax between the two computations."""

from __future__ import annotations

import json

import pytest
import reference_generate as reference
import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.parity

VOCAB = 512  # the session tokenizer's


def _model(init_std: float = 0.3, max_positions: int = 4096, seed: int = 3):
    from scaletrain.config.schema import ModelConfig
    from scaletrain.config.validate import resolve_model
    from scaletrain.models import build_model
    from scaletrain.nn import init_parameters

    m = resolve_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                                  vocab_size=VOCAB, init_std=init_std, max_position_embeddings=max_positions),
                      tokenizer_vocab=None, tp=1, seq_length=64)
    model = build_model(m, dtype=torch.float64)
    init_parameters(model, seed, tp_rank=0, tp_size=1)
    return model


@pytest.fixture
def kv_caches(monkeypatch) -> list:
    """Every KVCache the engine builds during the test."""
    import scaletrain.generation.decoding as decoding

    made: list = []

    class Recorded(decoding.KVCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(decoding, "KVCache", Recorded)
    return made


def test_greedy_generate_decodes_what_recomputation_does(kv_caches):
    from scaletrain.generation.turn import greedy_generate

    model = _model()
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    free = reference.greedy_generate(model, ids, 12)
    assert torch.equal(greedy_generate(model, ids, 12), free) and free.shape == (3, 19)
    # An eos the rows reach at different steps: finished rows are filled with it, the batch stops with the last.
    eos = int(free[0, 10])
    stopped = reference.greedy_generate(model, ids, 12, eos_id=eos)
    assert torch.equal(greedy_generate(model, ids, 12, eos_id=eos), stopped)
    assert len(kv_caches) == 2 and model.training  # the cache decoded; the mode is restored


def test_generate_turn_decodes_what_recomputation_does(tokenizer_dir, kv_caches):
    from scaletrain.generation.turn import ContextFull, generate_turn

    tok = load_tokenizer(str(tokenizer_dir))
    renderer = ChatRenderer(tok, "chatml")
    model = _model()
    for question in ("In the beginning", "And God said, Let there be light: and there was"):
        prompt = renderer.prompt_ids([{"role": "user", "content": question}])
        free = reference.generate_turn(model, prompt, tok, max_new_tokens=24)
        assert generate_turn(model, prompt, tok, max_new_tokens=24) == free and len(free) > 0
        # An end-of-turn marker the text reaches in pieces (text check), and one that is a single token (id check).
        ids = tok.encode(free)
        marker = tok.decode(ids[len(ids) // 2:len(ids) // 2 + 2])
        single = next(tok.decode([t]) for t in ids[3:] if tok.encode(tok.decode([t])) == [t])
        for stop in (marker, single, "<|im_end|>"):
            want = reference.generate_turn(model, prompt, tok, max_new_tokens=24, stop_text=stop)
            assert generate_turn(model, prompt, tok, max_new_tokens=24, stop_text=stop) == want
        assert len(reference.generate_turn(model, prompt, tok, max_new_tokens=24, stop_text=marker)) < len(free)
    assert len(kv_caches) == 8
    # Both stop at the model's positions, and refuse a prompt that already fills them.
    short = _model(max_positions=56)
    prompt = renderer.prompt_ids([{"role": "user", "content": "In the beginning"}])
    assert 40 < len(prompt) < 56  # room for fewer tokens than asked for
    assert generate_turn(short, prompt, tok, max_new_tokens=64) == reference.generate_turn(short, prompt, tok,
                                                                                           max_new_tokens=64)
    with pytest.raises(ContextFull, match="max_position_embeddings"):
        generate_turn(short, prompt + prompt, tok, max_new_tokens=4)


def test_sampled_turns_follow_their_generator(tokenizer_dir):
    from scaletrain.generation.turn import generate_turn

    tok = load_tokenizer(str(tokenizer_dir))
    model = _model()
    prompt = tok.encode("In the beginning")
    a = [generate_turn(model, prompt, tok, max_new_tokens=12, temperature=1.0, generator=g)
         for g in (torch.Generator().manual_seed(5),) * 2]  # one generator, two turns: it advances
    b = generate_turn(model, prompt, tok, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert a[0] == b and a[0] != a[1]


def test_tool_loop_and_exact_match_decode_what_recomputation_does(tokenizer_dir, monkeypatch, kv_caches):
    import scaletrain.chat.tool_loop as tool_loop
    import scaletrain.evaluation.synthetic as evaluate
    from scaletrain.chat.tools import bundled_tools
    from scaletrain.data.synth import problems, tool_problems

    tok = load_tokenizer(str(tokenizer_dir))
    renderer = ChatRenderer(tok, "chatml", tools=bundled_tools(["calculator"]))
    model = _model()
    # The tool loop: the same messages as with the reference decoder behind it.
    questions = [p.question for p in tool_problems(3, seed=1, split="test")]
    engine = [tool_loop.respond(model, renderer, [{"role": "user", "content": q}], bundled_tools(["calculator"]),
                                max_new_tokens=20) for q in questions]
    assert kv_caches
    with monkeypatch.context() as m:
        m.setattr(tool_loop, "generate_turn", reference.generate_turn)
        old = [tool_loop.respond(model, renderer, [{"role": "user", "content": q}], bundled_tools(["calculator"]),
                                 max_new_tokens=20) for q in questions]
    assert engine == old
    # exact_match: all problems decoded in batches of 4 (left-padded prompts of different lengths); each
    # answer it checks is the reference's greedy decode of that prompt alone.
    probs = problems(6, 0, "test")
    checked: list[str] = []
    monkeypatch.setattr(evaluate, "check_answer", lambda text, answer: checked.append(text) or False)
    for fmt in ("chat", "text"):
        checked.clear()
        evaluate.exact_match(model, renderer, probs, max_new_tokens=10, prompt_format=fmt, micro_batch=4)
        want = []
        for p in probs:
            ids = (renderer.prompt_ids([{"role": "user", "content": p.question}]) if fmt == "chat"
                   else tok.encode(f"Question: {p.question}\nAnswer:"))
            out = reference.greedy_generate(model, torch.tensor([ids]), 10, eos_id=tok.eos_id)
            want.append(tok.decode(out[0, len(ids):].tolist()))
        assert checked == want


@pytest.fixture
def hf_model_dir(tmp_path, tokenizer_dir):
    """A random float64 model as a Hugging Face directory with the session tokenizer."""
    from scaletrain.checkpoint.files import copy_tokenizer
    from scaletrain.checkpoint.hf import write_hf_dir
    from scaletrain.checkpoint.hf_config import TokenIds
    from scaletrain.models.llama.hf import to_hf_state_dict

    model = _model(init_std=0.3)
    out = tmp_path / "hf"
    copy_tokenizer(tokenizer_dir, out)
    tok = load_tokenizer(str(out))
    write_hf_dir(out, model.cfg, to_hf_state_dict(model.state_dict(), model.cfg), dtype="float64",
                 ids=TokenIds(bos=tok.bos_id, eos=tok.eos_id))
    return out, model, tok


def test_chat_command_decodes_what_recomputation_does(hf_model_dir, monkeypatch, capsys, kv_caches):
    import scaletrain.chat.tool_loop as tool_loop
    from scaletrain.cli import main

    out, _, _ = hf_model_dir
    args = ["chat", str(out), "--message", "In the beginning", "--message", "And the earth", "--json",
            "--max-new-tokens", "16", "--template", "chatml"]
    assert main(args) == 0
    engine = json.loads(capsys.readouterr().out)
    assert len(kv_caches) == 2  # one per turn
    monkeypatch.setattr(tool_loop, "generate_turn", reference.generate_turn)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == engine and len(engine) == 4


def test_eval_answers_decode_what_recomputation_does_in_every_layout(tmp_path, hf_model_dir):
    """`scaletrain eval`'s answer task in one process and at tp2·pp2+SP (4 ranks): every completion is the
    reference decoder's turn for that prompt."""
    from scaletrain.chat.rows import prompt_messages
    from scaletrain.cli import main

    from dist_harness import cli_rank, run_ranks

    out, model, tok = hf_model_dir
    rows = [{"prompt": q, "answer": i} for i, q in enumerate(
        ["In the beginning", "And God said", "Let there be light", "and the darkness he called Night", "Amen"])]
    task = tmp_path / "answers.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    renderer = ChatRenderer(tok, "chatml")
    marker = renderer.end_of_turn()
    want = [reference.generate_turn(model, renderer.prompt_ids(prompt_messages(r)), tok, max_new_tokens=14,
                                    stop_text=marker) for r in rows]
    common = ["eval", str(out), "--task", f"answer:{task}", "--max-new-tokens", "14", "--batch-size", "2",
              "--template", "chatml", "--seq-length", "96", "--set", "precision.dtype=float64"]
    assert main([*common, "--samples", str(tmp_path / "single.jsonl")]) == 0
    par = [*common, "--samples", str(tmp_path / "par.jsonl"), "--set", "parallel.tp=2", "--set", "parallel.pp=2",
           "--set", "parallel.sequence_parallel=true"]
    assert run_ranks(4, cli_rank, par, timeout=240) == [0] * 4
    for name in ("single", "par"):
        got = [json.loads(line)["completion"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert got == want, name
