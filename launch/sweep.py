"""Sweep one config over parallel layouts (tp × pp; dp fills the rest) for profiling, then compare them.

    python -m launch.sweep --config configs/llama3_8b.toml --set 'data.prefixes=[...]' --set data.tokenizer=... \
        --executor slurm --nodes 4 --gpus-per-node 8 --tp 1,2,4,8 --pp 1,2,4 --steps 30
    python -m launch.sweep ... --report      # one table of measured throughput per layout

Each layout is one job (its own allocation on Slurm) writing to <train.run_dir>/sweep/tp<T>-pp<P>.
Layouts that cannot run (sizes that do not divide, tp larger than a node) are listed with the reason
and skipped before anything is submitted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from launch.jobs import add_job_args, build_executor, build_task, check_config, experiment, procs_per_node


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def layouts(args: argparse.Namespace) -> tuple[list[tuple[int, int, list[str]]], list[str]]:
    """Valid (tp, pp, overrides) and one line per rejected layout."""
    from scaletrain.config import load_config

    world = args.nodes * procs_per_node(args)
    base = Path(load_config(args.config, args.overrides).train.run_dir)
    ok, rejected = [], []
    for tp in _ints(args.tp):
        for pp in _ints(args.pp):
            if tp > procs_per_node(args):
                rejected.append(f"tp{tp}-pp{pp}: tp {tp} > {procs_per_node(args)} processes per node "
                                "(tensor parallelism must stay inside a node)")
                continue
            sets = [*args.overrides, f"parallel.tp={tp}", f"parallel.pp={pp}", f"train.steps={args.steps}",
                    f"train.run_dir={base / 'sweep' / f'tp{tp}-pp{pp}'}", "checkpoint.interval=0",
                    "checkpoint.save_at_end=false", "train.eval_interval=0",
                    "optim.warmup_steps=1"]  # throughput does not depend on the schedule
            try:
                check_config(args.config, sets, world)
            except Exception as e:
                rejected.append(f"tp{tp}-pp{pp}: {str(e).replace(chr(10), ' ')}")
                continue
            ok.append((tp, pp, sets))
    return ok, rejected


def report(args: argparse.Namespace, runs: list[tuple[int, int, list[str]]]) -> list[dict]:
    """Median per-step figures of each finished layout (first `--skip` steps dropped: warm-up)."""
    from scaletrain.config import load_config

    world = args.nodes * procs_per_node(args)
    rows = []
    for tp, pp, sets in runs:
        run_dir = Path(load_config(args.config, sets).train.run_dir)
        path = run_dir / "metrics.jsonl"
        if not path.exists():
            rows.append({"layout": f"tp{tp}-pp{pp}", "status": "no metrics"})
            continue
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][args.skip:]
        if not steps:
            rows.append({"layout": f"tp{tp}-pp{pp}", "status": "too few steps"})
            continue
        tok = statistics.median(m["tokens_per_s"] for m in steps)
        mfu = [m["mfu"] for m in steps if m.get("mfu") is not None]
        rows.append({"layout": f"tp{tp}-pp{pp}-dp{world // (tp * pp)}", "status": "ok", "steps": len(steps),
                     "tokens_per_s_per_gpu": tok / world,
                     "tflops_per_gpu": statistics.median(m["tflops"] for m in steps),
                     "mfu": statistics.median(mfu) if mfu else None,
                     "step_time_s": statistics.median(m["step_time_s"] for m in steps),
                     "mem_gb": max(m["mem_gb"] for m in steps)})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'layout':<18} {'tok/s/GPU':>12} {'TFLOP/s/GPU':>12} {'MFU':>7} {'step s':>8} {'mem GB':>8}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['layout']:<18} {r['status']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—"
        print(f"{r['layout']:<18} {r['tokens_per_s_per_gpu']:>12,.0f} {r['tflops_per_gpu']:>12.2f} {mfu:>7} "
              f"{r['step_time_s']:>8.3f} {r['mem_gb']:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_args(p)
    p.add_argument("--tp", default="1,2,4,8", help="comma-separated tensor-parallel sizes")
    p.add_argument("--pp", default="1", help="comma-separated pipeline-parallel sizes")
    p.add_argument("--steps", type=int, default=20, help="steps per layout")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the report")
    p.add_argument("--report", action="store_true", help="print the table of finished layouts and stop")
    p.set_defaults(job_name="sweep")
    args = p.parse_args(argv)
    try:
        runs, rejected = layouts(args)
    except Exception as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    for line in rejected:
        print(f"skip {line}")
    if not runs:
        print("launch: error: no layout in the sweep can run", file=sys.stderr)
        return 2
    if args.report:
        print_table(report(args, runs))
        return 0
    print("layouts: " + ", ".join(f"tp{tp}-pp{pp}" for tp, pp, _ in runs))
    if args.dryrun:
        return 0
    executor = build_executor(args)
    with experiment(args, executor) as exp:
        for tp, pp, sets in runs:
            exp.add(build_task("train", args.config, sets, args.executor, procs_per_node(args)), executor=build_executor(args), name=f"tp{tp}-pp{pp}")
        exp.run(sequential=True, tail_logs=False, detach=args.executor == "slurm")
    states = {j.id: str(j.state) for j in exp.jobs}  # after the context has waited for local jobs
    print("launch: " + ", ".join(f"{k}: {v}" for k, v in states.items()))
    if args.executor == "local":
        print_table(report(args, runs))
        return 0 if all(v.startswith("SUCCEEDED") for v in states.values()) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
