"""Generation callers on the one KV-cache engine against the decoder they used before (recomputing every
prefix, kept as tests/reference_generate.py): a chat / tool-loop turn (`generate_turn`, one sequence) and
greedy answers to a set of questions (`evaluation.synthetic.exact_match`: one prompt at a time before,
batched now). Same model, same prompts, greedy — and the same tokens (checked). Runs interleaved over
rounds (the machine may be shared); medians.

    python benchmarks/bench_generate.py [--hidden 256 --layers 4 --turn-prompt 192 --turn-new 128 --rounds 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the reference decoder

import reference_generate as reference  # noqa: E402

from scaletrain.config.schema import ModelConfig  # noqa: E402
from scaletrain.config.validate import resolve_model  # noqa: E402
from scaletrain.data.preprocess import BUILTIN_CORPUS  # noqa: E402
from scaletrain.data.tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402
from scaletrain.generation.turn import generate_turn  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.nn import init_parameters  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--turn-prompt", type=int, default=192, help="prompt tokens of the chat turn")
    p.add_argument("--turn-new", type=int, default=128, help="tokens of the turn (no stop)")
    p.add_argument("--questions", type=int, default=32, help="exact_match: questions")
    p.add_argument("--answer-new", type=int, default=16, help="exact_match: tokens per answer")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (decoding is latency-bound)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        with gzip.open(BUILTIN_CORPUS, "rt") as f:
            texts = [json.loads(line)["text"] for line in f]
        tok = load_tokenizer(str(train_sentencepiece(texts, Path(tmp), 2048)))
    cfg = resolve_model(ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                                    ffn_hidden_size=3 * args.hidden, vocab_size=tok.vocab_size, init_std=0.3),
                        tokenizer_vocab=None, tp=1, seq_length=512)
    model = build_model(cfg)
    init_parameters(model, 0)
    import scaletrain.evaluation.synthetic as evaluate
    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.data.synth import problems

    renderer = ChatRenderer(tok, "chatml")
    prompt = tok.encode(" ".join(texts[0].split()))[: args.turn_prompt]
    never = "\x00never"  # no stop: every turn runs its full length
    probs = problems(args.questions, 0, "test")

    def turn(fn):
        return fn(model, prompt, tok, max_new_tokens=args.turn_new, stop_text=never)

    answers: list[str] = []
    evaluate.check_answer = lambda text, answer: answers.append(text) or False  # record what is checked

    def exact_engine():
        answers.clear()
        evaluate.exact_match(model, renderer, probs, max_new_tokens=args.answer_new)
        return list(answers)

    def exact_reference():
        out = []
        for q in probs:
            ids = renderer.prompt_ids([{"role": "user", "content": q.question}])
            gen = reference.greedy_generate(model, torch.tensor([ids]), args.answer_new, eos_id=tok.eos_id)
            out.append(tok.decode(gen[0, len(ids):].tolist()))
        return out

    cases = {"chat / tool-loop turn (generate_turn)": (lambda: turn(generate_turn), lambda: turn(reference.generate_turn)),
             "greedy answers (exact_match)": (exact_engine, exact_reference)}
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in cases}
    same = True
    for engine, ref in cases.values():  # warm-up: first-call costs (imports, allocator) of both paths
        engine()
        ref()
    for _ in range(args.rounds):
        for name, (engine, ref) in cases.items():
            a, t_engine = _timed(engine)
            b, t_ref = _timed(ref)
            same &= a == b
            times[name][0].append(t_engine)
            times[name][1].append(t_ref)
    print(f"model h{args.hidden}×{args.layers}L, vocab {tok.vocab_size} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params, fp32), {args.threads} threads; turn: {len(prompt)} prompt + {args.turn_new} new tokens; answers: "
          f"{args.questions} questions × {args.answer_new} tokens; medians of {args.rounds} interleaved rounds")
    print("| caller | KV-cache engine s | recompute (old) s | speedup |")
    print("|---|---|---|---|")
    for name, (eng, ref) in times.items():
        e, r = statistics.median(eng), statistics.median(ref)
        print(f"| {name} | {e:.2f} | {r:.2f} | {r / e:.1f}× |")
    print(f"same tokens: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
