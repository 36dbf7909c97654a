"""GRPO rollout throughput: incremental decoding with the KV cache against recomputing every prefix
(the te backend's path, and before the cache reached them the pipeline and SP layouts'), on one
process, same model, same prompts, same generators — and the same tokens (checked).

    python benchmarks/bench_rollout.py [--hidden 64 --layers 4 --prompt 64 --new 32 --prompts 8 --group 8]
    python benchmarks/bench_rollout.py --cps 1 2      # rollouts under context parallelism
    python benchmarks/bench_rollout.py --tp-sp 2      # tp+SP: SP lifted for the KV cache vs recomputing
    python benchmarks/bench_rollout.py --pp 2         # pipeline stages with their own caches vs recomputing
    python benchmarks/bench_rollout.py --engine --new 256 --stop-share 0.02   # the decoder vs its first version

Prints completion tokens/s of both and their ratio. With --cps, the same sampling on a model
parallelized at each cp (forked gloo ranks, one thread each): the cp ranks sample shares of the
prompts on whole sequences with the KV cache and gather them, so the job's tokens/s should grow
with cp while every rank ends with cp1's tokens (checked). With --tp-sp N, a model at tpN with sequence
parallelism decodes with SP lifted and the KV cache against SP's per-token recomputation (the path such
layouts took before), on N ranks; --pp N likewise on N pipeline stages. With --engine, the KV-cache
decoder as it is (buffers allocated once and written in place; finished rows leave the batch)
against its first version (the cache concatenated per token; finished rows fed to the end), on
completions of varied length: --stop-share of the vocabulary ends a completion.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the forked-ranks harness

from scaletrain.config.schema import ModelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.distributed import ParallelDims
from scaletrain.generation.sampler import sample_completions, sampling_generator
from scaletrain.models import build_model
from scaletrain.nn import init_parameters
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
    p.add_argument("--cps", type=int, nargs="*", default=None, help="compare these cp sizes instead")
    p.add_argument("--tp-sp", type=int, default=0, help="compare cached and recomputed decoding at this tp with SP")
    p.add_argument("--pp", type=int, default=0, help="compare cached and recomputed decoding on this many stages")
    p.add_argument("--engine", action="store_true", help="compare the KV-cache decoder with its first version")
    p.add_argument("--stop-share", type=float, default=0.0, help="share of the vocabulary that ends a completion")
    args = p.parse_args()
    if args.engine:
        return _compare_engine(args)
    if args.cps:
        return _compare_cp(args)
    if args.tp_sp or args.pp:
        return _compare_layout(args)
    torch.set_num_threads(args.threads)
    model, prompts, kw = _setup(args)
    results = {}
    for cached in (True, False):
        gens = [sampling_generator(0, i) for i in range(args.prompts)]
        t0 = time.perf_counter()
        out, _ = sample_completions(model, ParallelDims.single(), prompts, gens, kv_cache=cached, **kw)
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


def _setup(args, dims=None, parallel=None):
    """The model (parallelized at `dims` with `parallel` when given), prompts and sampling settings."""
    m = resolve_model(ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2,
                                  ffn_hidden_size=3 * args.hidden, vocab_size=args.vocab), tokenizer_vocab=None,
                      tp=dims.tp if dims is not None else 1, seq_length=args.prompt + args.new)
    model = build_model(m, tp_size=dims.tp if dims is not None else 1, dtype=torch.float32)
    if dims is not None:
        from scaletrain.parallel.parallelize import parallelize

        model = parallelize(model, dims, parallel)
    init_parameters(model, 0, tp_rank=dims.tp_rank if dims is not None else 0, tp_size=dims.tp if dims is not None else 1)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab, (args.prompt,), generator=gen).tolist() for _ in range(args.prompts)]
    stop_ids = set(range(3, 3 + round(args.stop_share * args.vocab)))
    kw = dict(group_size=args.group, max_new_tokens=args.new, temperature=1.0, stop_ids=stop_ids, pad_id=0,
              vocab_limit=args.vocab, micro_batch=args.micro, precision=Precision(torch.float32, None, "cpu", "bench"),
              device=torch.device("cpu"))
    return model, prompts, kw


@contextmanager
def _first_decoder():
    """The KV-cache decoder as first written: every token concatenates the cache (a copy of all of it)
    and finished rows keep being fed to the last step."""
    import scaletrain.generation.decoding as decoding

    cache, drop = decoding.KVCache, decoding.CachedLogits.drop_finished
    decoding.KVCache = lambda capacity=None: cache()  # type: ignore[misc,assignment]
    decoding.CachedLogits.drop_finished = lambda self, stopped: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        decoding.KVCache, decoding.CachedLogits.drop_finished = cache, drop  # type: ignore[misc,method-assign]


def _compare_engine(args) -> int:
    torch.set_num_threads(args.threads)
    model, prompts, kw = _setup(args)
    sample_completions(model, ParallelDims.single(), prompts[:1], [sampling_generator(0, 0)], kv_cache=True, **kw)  # warm-up
    results = {}
    for name in ("in place, finished rows dropped", "concatenated, finished rows fed"):
        gens = [sampling_generator(0, i) for i in range(args.prompts)]
        with _first_decoder() if name.startswith("concat") else nullcontext():
            t0 = time.perf_counter()
            out, _ = sample_completions(model, ParallelDims.single(), prompts, gens, kv_cache=True, **kw)
            dt = time.perf_counter() - t0
        results[name] = (out, sum(len(c) for c in out) / dt, dt)
    (new, old) = results.values()
    lengths = sorted(len(c) for c in new[0])
    print(f"model h{args.hidden}×{args.layers}L, {args.prompts} prompts × {args.group} completions, prompt "
          f"{args.prompt} + up to {args.new} new tokens, {len(kw['stop_ids'])} stop tokens (completion length "
          f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}), {args.threads} thread(s)")
    print(f"{'KV cache':<34} {'tokens/s':>10} {'seconds':>8}")
    for name, (_, rate, dt) in results.items():
        print(f"{name:<34} {rate:>10,.0f} {dt:>8.2f}")
    same = new[0] == old[0]
    print(f"speed-up {new[1] / old[1]:.2f}×; same tokens: {same}")
    return 0 if same else 1


def _cp_rank(rank: int, world: int, args) -> tuple[list[list[int]], float]:
    from scaletrain.config.schema import ParallelConfig
    from scaletrain.distributed import ParallelDims

    torch.set_num_threads(1)
    parallel = ParallelConfig(cp=world)
    dims = ParallelDims.from_config(parallel, world, rank)
    model, prompts, kw = _setup(args, dims, parallel)
    gens = [sampling_generator(0, i) for i in range(args.prompts)]
    dims.comm("cp").barrier()  # start the clock together
    t0 = time.perf_counter()
    out, _ = sample_completions(model, dims, prompts, gens, **kw)
    return out, time.perf_counter() - t0


def _layout(args):
    from scaletrain.config.schema import ParallelConfig

    return ParallelConfig(tp=args.tp_sp, sequence_parallel=True) if args.tp_sp else ParallelConfig(pp=args.pp)


def _layout_rank(rank: int, world: int, args) -> dict[bool, tuple[list[list[int]], float]]:
    from scaletrain.distributed import ParallelDims

    torch.set_num_threads(1)
    parallel = _layout(args)
    dims = ParallelDims.from_config(parallel, world, rank)
    model, prompts, kw = _setup(args, dims, parallel)
    out = {}
    for cached in (True, False):
        gens = [sampling_generator(0, i) for i in range(args.prompts)]
        dims.comm("tp" if args.tp_sp else "pp").barrier()
        t0 = time.perf_counter()
        tokens, _ = sample_completions(model, dims, prompts, gens, width_multiple=args.tp_sp or 1,
                                       kv_cache=None if cached else False, **kw)
        out[cached] = (tokens, time.perf_counter() - t0)
    return out


def _compare_layout(args) -> int:
    from dist_harness import run_ranks

    world = args.tp_sp or args.pp
    results = run_ranks(world, _layout_rank, args, timeout=1800)
    where = f"tp{args.tp_sp}+SP" if args.tp_sp else f"pp{args.pp}"
    print(f"model h{args.hidden}×{args.layers}L at {where}, {args.prompts} prompts × {args.group} "
          f"completions, prompt {args.prompt} + {args.new} new tokens, one thread per rank")
    print(f"{'decoding':<40} {'tokens/s':>10} {'seconds':>8}")
    rate = {}
    names = ("KV cache, SP lifted for decoding", "recompute per token under SP") if args.tp_sp else \
        ("KV cache per stage", "recompute per token")
    for cached, name in zip((True, False), names):
        seconds = max(r[cached][1] for r in results)
        rate[cached] = sum(len(c) for c in results[0][cached][0]) / seconds
        print(f"{name:<40} {rate[cached]:>10,.0f} {seconds:>8.2f}")
    same = all(r[True][0] == r[False][0] == results[0][True][0] for r in results)
    print(f"speed-up {rate[True] / rate[False]:.1f}×; same tokens: {same}")
    return 0 if same else 1


def _compare_cp(args) -> int:
    from dist_harness import run_ranks

    print(f"model h{args.hidden}×{args.layers}L, {args.prompts} prompts × {args.group} completions, prompt "
          f"{args.prompt} + {args.new} new tokens, one thread per rank, KV cache where the layout allows")
    print(f"{'cp':>3} {'ranks':>5} {'seconds':>8} {'job tokens/s':>13} {'per rank':>9} {'vs cp1':>7}  same tokens")
    base, ok = None, True
    for cp in args.cps:
        results = run_ranks(cp, _cp_rank, args, timeout=1800)
        tokens = results[0][0]
        seconds = max(r[1] for r in results)  # the job waits for its slowest rank
        same = all(r[0] == tokens for r in results) and (base is None or tokens == base[0])
        ok &= same
        rate = sum(len(c) for c in tokens) / seconds
        base = base or (tokens, rate)
        print(f"{cp:>3} {cp:>5} {seconds:>8.2f} {rate:>13,.0f} {rate / cp:>9,.0f} {rate / base[1]:>6.2f}×  {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
