"""Pretraining-vertical benchmark: preprocessing tokens/s, training tokens/s, framework overhead.

    python benchmarks/bench_pretrain.py [--quick] [--only tiny|wide] [--steps N]

The overhead is measured against an independent baseline: a plain training loop over transformers'
`LlamaForCausalLM` of the same config, holding scaletrain's initial weights (converted with
`models/llama/hf.py`), on the very batches the run reads (drawn beforehand from the run's own Megatron
dataset), with the same AdamW settings (decay on matrices only, foreach), the same learning-rate
schedule and grad-norm clipping — forward, F.cross_entropy, backward, clip, step, and reading the loss
every step. Its losses are checked against the run's (same training, so they agree to float32
rounding). A second baseline, the same loop over scaletrain's own model class, separates the model's
cost from the framework's. The framework side is the Trainer exactly as `scaletrain train` builds it
(Megatron dataset and loader, objective, schedule, normalisation, metrics and metrics.jsonl), stepped
through its loop body `Trainer._step` (what `run()` repeats). The three run in lockstep in one process —
step i of each, in an order rotating every step — so the load of a shared machine falls on all three
alike; same thread count, a few warm-up steps untimed. Reported: the median over steps of the per-step
ratio of wall time, and of the process's CPU time (user + system: what each step cost in work, which
other jobs on the machine disturb far less than wall time; set OMP_WAIT_POLICY=PASSIVE so waiting
threads do not spin). Target: overhead ≤ 3% against the transformers loop.
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


def _run_batches(config: str, overrides: list[str], steps: int, run_dir: Path) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The (tokens, labels) microbatches of the run's first `steps` steps, from its own data loader."""
    from scaletrain.build import build_trainer

    cfg = load_config(config, overrides + [f"train.steps={steps}", f"train.run_dir={run_dir}"])
    trainer = build_trainer(cfg)
    try:
        batches = [next(trainer.train_batches) for _ in range(steps)]
    finally:
        trainer.sinks.close()
    assert all(bool(mb["loss_mask"].all()) for b in batches for mb in b), "the baseline assumes no masked tokens"
    return [[(mb["tokens"], mb["labels"]) for mb in b] for b in batches]


def _hf_model(cfg) -> torch.nn.Module:
    """transformers' LlamaForCausalLM of `cfg.model`, holding scaletrain's initial weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaletrain.models.llama.hf import config_to_hf, to_hf_state_dict

    ours = build_model(cfg.model)
    init_parameters(ours, cfg.train.seed)
    hf_cfg = LlamaConfig.from_dict(config_to_hf(cfg.model, bos_id=None, eos_id=None, dtype="float32"))
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg.model), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.train()


def _plain_loop(cfg, model: torch.nn.Module, steps: list[list[tuple[torch.Tensor, torch.Tensor]]], hf: bool):
    """A plain training loop over `model` (transformers' or scaletrain's class): yields each step's loss."""
    from scaletrain.trainer.lr_schedule import lr_at
    from scaletrain.trainer.optimizer import param_groups

    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            foreach=True)
    for i, micro_batches in enumerate(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(i, o, len(steps))
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for x, y in micro_batches:
            logits = model(input_ids=x).logits if hf else model(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad, foreach=True)
        opt.step()
        yield float(total)  # the framework reads its loss every step too


def _framework_loop(config: str, overrides: list[str], steps: int, run_dir: Path):
    """`scaletrain train`'s Trainer, one loop body (`Trainer._step`, what `run()` repeats) per next()."""
    import json

    from scaletrain.build import build_trainer

    cfg = load_config(config, overrides + [f"train.steps={steps}", f"train.run_dir={run_dir}"])
    trainer = build_trainer(cfg)
    trainer.model.train()
    try:
        for _ in range(steps):
            trainer._step(0)
            yield None
    finally:
        trainer.sinks.close()
    yield [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def bench_training(name: str, config: str, overrides: list[str], steps: int, warmup: int, work: Path) -> dict:
    """The three loops in lockstep: step i of each, in an order that rotates every step, so that the
    machine's load (shared with other jobs) falls on all three alike; per-step times, medians."""
    cfg = load_config(config, overrides)
    model_cfg = resolve_model(cfg.model, tokenizer_vocab=2048, tp=1, seq_length=cfg.train.seq_length)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    t = cfg.train
    total = warmup + steps
    batches = _run_batches(config, overrides, total, work / f"{name}-data")
    ours = build_model(cfg.model)
    init_parameters(ours, cfg.train.seed)
    loops = {"framework": _framework_loop(config, overrides, total, work / f"{name}-run"),
             "hf": _plain_loop(cfg, _hf_model(cfg), batches, hf=True),
             "plain": _plain_loop(cfg, ours.train(), batches, hf=False)}
    times: dict[str, list[float]] = {k: [] for k in loops}
    cpu: dict[str, list[float]] = {k: [] for k in loops}
    losses: dict[str, list[float]] = {"hf": []}
    names = list(loops)
    for i in range(total):
        for k in names[i % 3:] + names[:i % 3]:
            t0, c0 = time.perf_counter(), time.process_time()
            out = next(loops[k])
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
            if k == "hf":
                losses["hf"].append(out)
    f_losses = next(loops["framework"])
    med = statistics.median
    tokens = t.global_batch_size * t.seq_length
    f_med, h_med, p_med = med(times["framework"]), med(times["hf"]), med(times["plain"])
    loss_gap = max(abs(a - b) / abs(b) for a, b in zip(f_losses, losses["hf"]))
    return {"name": name, "params": parameter_counts(model_cfg)["total"], "tokens_per_step": tokens,
            "framework_tok_s": tokens / f_med, "hf_tok_s": tokens / h_med, "plain_tok_s": tokens / p_med,
            "overhead": med([f / h for f, h in zip(times["framework"], times["hf"])]) - 1,
            "overhead_cpu": med([f / h for f, h in zip(cpu["framework"], cpu["hf"])]) - 1,
            "model_vs_hf_cpu": med([p / h for p, h in zip(cpu["plain"], cpu["hf"])]) - 1,
            "cpu_ms": {k: 1e3 * med(v) for k, v in cpu.items()},
            "loss_gap": loss_gap, "steps": steps}


WIDE = ["model.hidden_size=1024", "model.num_heads=16", "model.num_kv_heads=8", "model.ffn_hidden_size=2816",
        "model.num_layers=2", "train.global_batch_size=4", "train.micro_batch_size=2"]
"""The 1024-wide shape: tiny.toml's run at Llama width 1024 (GQA 16/8 heads, ffn 2816), 2 layers, seq 128."""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds (a smoke run)")
    ap.add_argument("--only", choices=("tiny", "wide"), default=None, help="one training shape (and no preprocessing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="timed steps per loop (default: tiny 60, wide 12; --quick 5)")
    args = ap.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = work / "tok"
        train_sentencepiece((__import__("json").loads(line)["text"]
                             for line in __import__("gzip").open(BUILTIN_CORPUS, "rt")), tok, 2048)
        pre = bench_preprocess(work, tok) if args.only is None else []
        if args.only is not None:
            preprocess([str(BUILTIN_CORPUS)], str(tok), str(work / "kjv_w1"))
        common = [f"data.tokenizer={tok}", f'data.prefixes=["{work / "kjv_w1"}"]', "train.eval_interval=0",
                  "checkpoint.save_at_end=false", "checkpoint.interval=0", "logging.tensorboard=false",
                  "logging.interval=1000000", f"train.threads={threads}", "train.deterministic=false",
                  "train.device=cpu", "precision.dtype=float32", "optim.warmup_steps=0"]
        rows = []
        if args.only in (None, "tiny"):
            rows.append(bench_training("tiny (configs/tiny.toml, fp32)", str(REPO / "configs/tiny.toml"), common,
                                       args.steps or (5 if args.quick else 60), 3, work))
        if args.only in (None, "wide"):
            rows.append(bench_training("1024-wide (tiny.toml + h1024, 16/8 heads, ffn 2816, 2 layers), fp32",
                                       str(REPO / "configs/tiny.toml"), common + WIDE,
                                       args.steps or (5 if args.quick else 12), 2, work))
    load_after = os.getloadavg()
    print(f"\n# scaletrain pretraining benchmark — {time.strftime('%Y-%m-%d %H:%M')}")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {threads} threads; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    if pre:
        print("| preprocessing (KJV, 1 doc/chapter) | tokens | tokens/s |")
        print("|---|---|---|")
        for workers, tps, tokens in pre:
            print(f"| {workers} worker{'s' if workers > 1 else ''} | {tokens:,} | {tps:,.0f} |")
    print("\n| training config | params | tokens/step | steps | scaletrain tok/s | transformers loop tok/s | "
          "overhead, wall | overhead, CPU time | CPU ms/step: scaletrain, transformers loop, same loop on "
          "scaletrain's model | max loss gap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        c = r["cpu_ms"]
        print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_step']} | {r['steps']} | "
              f"{r['framework_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | {100 * r['overhead']:+.1f}% | "
              f"{100 * r['overhead_cpu']:+.1f}% | {c['framework']:.1f}, {c['hf']:.1f}, {c['plain']:.1f} "
              f"({100 * r['model_vs_hf_cpu']:+.1f}%) | {r['loss_gap']:.1e} |")
        ok &= r["overhead"] <= 0.03
    print(f"\nframework overhead ≤ 3% against the transformers loop on every config: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
