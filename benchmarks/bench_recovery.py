"""What issue 21's recovery checks cost at checkpoint time (CPU, single process).

- the weights' finiteness check each checkpoint now records (`good`), next to the save it precedes;
- `convert to-hf` into a new directory vs over an existing export (written beside, fsynced, swapped in).

    python -W ignore benchmarks/bench_recovery.py [--hidden 1024 --layers 4 --vocab 32000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from scaletrain.checkpoint import save_checkpoint
from scaletrain.config.schema import ModelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.distributed import ParallelDims
from scaletrain.distributed.comm import Comm
from scaletrain.export import export_to_hf
from scaletrain.models import build_model
from scaletrain.nn import init_parameters
from scaletrain.trainer.divergence import weights_finite


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = resolve_model(ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                                    num_heads=16, num_kv_heads=4), tokenizer_vocab=None, tp=1, seq_length=128)
    model = build_model(cfg)
    init_parameters(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randint(0, args.vocab, (1, 16))).float().sum().backward()
    opt.step()
    params = sum(p.numel() for p in model.parameters())
    check = _median(lambda: weights_finite(model, Comm.single("world"), torch.device("cpu")), args.repeats)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        root = Path(tmp)
        step = iter(range(1, 1000))
        state = {"consumed_samples": 0, "model_config": cfg.__dict__}
        save = _median(lambda: save_checkpoint(root / "ckpt", next(step), model, opt, state, keep_last=1, dims=ParallelDims.single()),
                       args.repeats)
        ckpt = root / "ckpt"
        counter = iter(range(1000))
        fresh = _median(lambda: export_to_hf(ckpt, root / f"new{next(counter)}"), args.repeats)
        over = _median(lambda: export_to_hf(ckpt, root / "same"), args.repeats)
    print(f"model: {params / 1e6:.1f}M params (fp32), AdamW state")
    print(f"weights_finite: {check * 1e3:.1f} ms; save_checkpoint: {save * 1e3:.0f} ms "
          f"({100 * check / save:.1f}% of the save)")
    print(f"convert to-hf into a new directory: {fresh * 1e3:.0f} ms; over an existing export: {over * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
