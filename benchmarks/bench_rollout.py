"""GRPO rollout throughput: incremental decoding with the KV cache against recomputing every prefix
(the path pipeline-parallel and sequence-parallel layouts take), on one process, same model, same
prompts, same generators — and the same tokens (checked).

    python benchmarks/bench_rollout.py [--hidden 64 --layers 4 --prompt 64 --new 32 --prompts 8 --group 8]

Prints completion tokens/s of both and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from scaletrain.config.schema import ModelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.models import build_model
from scaletrain.nn import init_parameters
from scaletrain.posttrain.rollout import sample_completions, sampling_generator
from scaletrain.trainer.precision import Precision


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=384)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="tokens sampled per completion (no stop token)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--micro", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m = resolve_model(ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2,
                                  ffn_hidden_size=3 * args.hidden, vocab_size=args.vocab), tokenizer_vocab=None, tp=1,
                      seq_length=args.prompt + args.new)
    model = build_model(m, dtype=torch.float32)
    init_parameters(model, 0, tp_rank=0, tp_size=1)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab, (args.prompt,), generator=gen).tolist() for _ in range(args.prompts)]
    kw = dict(group_size=args.group, max_new_tokens=args.new, temperature=1.0, stop_ids=set(), pad_id=0,
              vocab_limit=args.vocab, micro_batch=args.micro, precision=Precision(torch.float32, None, "cpu", "bench"),
              device=torch.device("cpu"))
    results = {}
    for cached in (True, False):
        gens = [sampling_generator(0, i) for i in range(args.prompts)]
        t0 = time.perf_counter()
        out, _ = sample_completions(model, None, prompts, gens, kv_cache=cached, **kw)
        dt = time.perf_counter() - t0
        results[cached] = (out, sum(len(c) for c in out) / dt, dt)
    same = results[True][0] == results[False][0]
    print(f"model h{args.hidden}×{args.layers}L ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), "
          f"{args.prompts} prompts × {args.group} completions, prompt {args.prompt} + {args.new} new tokens, "
          f"{args.threads} thread(s)")
    print(f"{'decoding':<22} {'tokens/s':>10} {'seconds':>8}")
    for cached, name in ((True, "KV cache"), (False, "recompute per token")):
        print(f"{name:<22} {results[cached][1]:>10,.0f} {results[cached][2]:>8.2f}")
    print(f"speed-up {results[True][1] / results[False][1]:.1f}×; same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
