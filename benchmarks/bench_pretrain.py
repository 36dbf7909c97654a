"""Pretraining-vertical benchmark: preprocessing tokens/s, training tokens/s, framework overhead.

    python benchmarks/bench_pretrain.py [--quick]

Baseline for the overhead ratio: a plain PyTorch loop over the *same* model class and shapes —
forward, cross-entropy, backward, grad-norm clipping, torch AdamW — on batches already in memory,
with no framework (no data loader, schedule, objective, metrics or logging). The framework side is
`Trainer.run()` exactly as `scaletrain train` builds it (real Megatron dataset, sinks writing
metrics.jsonl). Both run in this one process, interleaved over several rounds, same thread
count; the table reports the median step time of each. Target: overhead < 5%.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.config import load_config, resolve_model  # noqa: E402
from scaletrain.data.preprocess import BUILTIN_CORPUS, preprocess  # noqa: E402
from scaletrain.data.tokenizer import train_sentencepiece  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.nn import init_parameters  # noqa: E402
from scaletrain.trainer.flops import parameter_counts  # noqa: E402


def bench_preprocess(work: Path, tokenizer: Path) -> list[tuple[int, float, int]]:
    rows = []
    for workers in (1, 2):
        stats = preprocess([str(BUILTIN_CORPUS)], str(tokenizer), str(work / f"kjv_w{workers}"), workers=workers)
        rows.append((workers, stats.tokens_per_s, stats.tokens))
    return rows


def _framework_step_time(config: str, overrides: list[str], steps: int, run_dir: Path) -> float:
    from scaletrain.train import build_trainer

    cfg = load_config(config, overrides + [f"train.steps={steps}", f"train.run_dir={run_dir}"])
    trainer = build_trainer(cfg)
    try:
        t0 = time.perf_counter()
        trainer.run()
        return (time.perf_counter() - t0) / steps
    finally:
        trainer.sinks.close()


def _plain_step_time(cfg, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> float:
    model = build_model(cfg.model)
    init_parameters(model, cfg.train.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay, foreach=True)
    n = len(micro_batches)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for x, y in micro_batches:
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) / n
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        float(loss)  # the framework reads its loss every step too
    return (time.perf_counter() - t0) / steps


def bench_training(name: str, config: str, overrides: list[str], steps: int, rounds: int, work: Path) -> dict:
    cfg = load_config(config, overrides)
    model_cfg = resolve_model(cfg.model, tokenizer_vocab=2048, tp=1, seq_length=cfg.train.seq_length)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    t = cfg.train
    g = torch.Generator().manual_seed(0)
    mbs = [(torch.randint(0, 2048, (t.micro_batch_size, t.seq_length), generator=g),
            torch.randint(0, 2048, (t.micro_batch_size, t.seq_length), generator=g))
           for _ in range(t.global_batch_size // t.micro_batch_size)]
    # Warm up both paths (allocator, thread pools, first-call overheads) before timing.
    _framework_step_time(config, overrides, 2, work / f"{name}-warm")
    _plain_step_time(cfg, mbs, 2)
    fw, plain = [], []
    for r in range(rounds):
        fw.append(_framework_step_time(config, overrides, steps, work / f"{name}-{r}"))
        plain.append(_plain_step_time(cfg, mbs, steps))
    tokens = t.global_batch_size * t.seq_length
    f_med, p_med = statistics.median(fw), statistics.median(plain)
    return {"name": name, "params": parameter_counts(model_cfg)["total"], "tokens_per_step": tokens,
            "framework_tok_s": tokens / f_med, "plain_tok_s": tokens / p_med, "overhead": f_med / p_med - 1,
            "framework_s": f_med, "plain_s": p_med}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds (a smoke run)")
    args = ap.parse_args()
    threads = 2
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = work / "tok"
        train_sentencepiece((__import__("json").loads(line)["text"]
                             for line in __import__("gzip").open(BUILTIN_CORPUS, "rt")), tok, 2048)
        pre = bench_preprocess(work, tok)
        common = [f"data.tokenizer={tok}", f'data.prefixes=["{work / "kjv_w1"}"]', "train.eval_interval=0",
                  "checkpoint.save_at_end=false", "checkpoint.interval=0", "logging.tensorboard=false",
                  "logging.interval=1000000", f"train.threads={threads}", "train.deterministic=false",
                  "train.device=cpu", "precision.dtype=float32", "optim.warmup_steps=0"]
        steps, rounds = (5, 2) if args.quick else (20, 3)
        rows = [bench_training("tiny", str(REPO / "configs/tiny.toml"), common, steps, rounds, work)]
        big = common + ["model.num_layers=2", "train.seq_length=128", "train.global_batch_size=2",
                        "train.micro_batch_size=1"]
        rows.append(bench_training("llama3_1b shape, 2 layers", str(REPO / "configs/llama3_1b.toml"), big,
                                   2 if args.quick else 3, rounds, work))
    load_after = os.getloadavg()
    print(f"\n# scaletrain pretraining benchmark — {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{threads} threads; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    print("| preprocessing (KJV, 1 doc/chapter) | tokens | tokens/s |")
    print("|---|---|---|")
    for workers, tps, tokens in pre:
        print(f"| {workers} worker{'s' if workers > 1 else ''} | {tokens:,} | {tps:,.0f} |")
    print("\n| training config | params | tokens/step | scaletrain tok/s | plain PyTorch tok/s | overhead |")
    print("|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_step']} | {r['framework_tok_s']:,.0f} | "
              f"{r['plain_tok_s']:,.0f} | {100 * r['overhead']:+.1f}% |")
        ok &= r["overhead"] < 0.05
    print(f"\nframework overhead < 5% on every config: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
