"""The training loop: steps, validation, checkpoints, exit interval, metrics.

Everything it drives (model, optimizer, data, objective) is built elsewhere and handed in; the
loop is the same for every stage.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaletrain.checkpoint import load_checkpoint, save_checkpoint
from scaletrain.checkpoint.files import step_dir_name
from scaletrain.checkpoint.save import PendingSave
from scaletrain.checkpoint.select import newest_good, step_of
from scaletrain.config.schema import RunConfig
from scaletrain.distributed.comm import CollectiveError, Comm
from scaletrain.distributed.dims import ParallelDims
from scaletrain.distributed.heartbeat import Heartbeat
from scaletrain.trainer.contracts import BatchSource, Objective, Phase, Validator
from scaletrain.trainer.divergence import MAX_ROLLBACKS, DivergenceError, DivergenceGuard, weights_finite
from scaletrain.trainer.flops import device_peak_tflops, flops_per_token
from scaletrain.trainer.lr_schedule import lr_at
from scaletrain.trainer.memory import format_report, memory_report
from scaletrain.trainer.precision import Precision
from scaletrain.trainer.sinks import MetricSinks
from scaletrain.trainer.step import train_step
from scaletrain.trainer.stop import StopRequest, agree


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, JSON-serialisable."""
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [int(x) if not isinstance(x, str) else x for x in _np_state()],
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return [name, *keys.tolist(), pos, has_gauss, cached]  # type: ignore[attr-defined]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1:625], dtype=np.uint32), npst[625], npst[626], npst[627]))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


@dataclass
class LoopState:
    step: int
    consumed_samples: int


class Trainer:
    """Runs steps [state.step, cfg.train.steps) with validation, checkpointing and exit interval."""

    def __init__(self, cfg: RunConfig, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 objective: Objective, train_batches: BatchSource, precision: Precision, device: torch.device,
                 sinks: MetricSinks, run_dir: Path, state: LoopState, dims: ParallelDims,
                 validator: Validator | None = None, phases: Sequence[Phase] = (),
                 downstream: Callable[[], dict[str, Any]] | None = None, stop: StopRequest | None = None) -> None:
        self.cfg, self.model, self.optimizer, self.objective = cfg, model, optimizer, objective
        self.train_batches = train_batches
        self.precision, self.device, self.sinks, self.run_dir = precision, device, sinks, run_dir
        self.state, self.dims = state, dims
        self.validator = validator  # what a validation computes (the loss over held-out batches; GRPO: rewards)
        self.phases = tuple(phases)  # the stage's extra work at named points (trainer/contracts.py Phase)
        self.downstream = downstream  # train.eval_tasks at validations (evaluation/during_training.py)
        self._pending: PendingSave | None = None  # an asynchronous checkpoint still being written
        self.stop = stop  # signals that ask to save and stop (trainer/stop.py), installed by the entry point
        self.guard = DivergenceGuard(cfg.train)  # non-finite steps and loss spikes (trainer/divergence.py)
        self.world_size = dims.world_size
        t = cfg.train
        self.tokens_per_step = t.global_batch_size * t.seq_length
        self.flops_per_token = flops_per_token(cfg.model, t.seq_length)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.peak_tflops = device_peak_tflops(name, "fp8" if cfg.precision.fp8 else "bfloat16") \
            if device.type == "cuda" and precision.autocast_dtype is not None else None

    def _checkpoint(self, health: dict[str, Any]) -> Path:
        self.wait_for_save()  # one save in flight at a time
        trainer_state = {"consumed_samples": self.state.consumed_samples,
                         "model_config": dataclasses.asdict(self.cfg.model), **health}
        result = save_checkpoint(self.run_dir / "checkpoints", self.state.step, self.model, self.optimizer,
                                 trainer_state, keep_last=self.cfg.checkpoint.keep_last,
                                 rank_state={"rng": rng_state()}, dims=self.dims,
                                 tokenizer=self.cfg.data.tokenizer or None, async_save=self.cfg.checkpoint.async_save)
        for p in self.phases:  # what a phase trains beside the policy (PPO's critic), at the same step
            p.on_checkpoint(self.run_dir, self.state.step, health)
        if isinstance(result, Path):
            return result
        self._pending = result
        return result.final

    def wait_for_save(self) -> None:
        if self._pending is not None:
            path = self._pending.wait()
            self.sinks.info(f"checkpoint {path} complete")
            self._pending = None

    def _validate(self) -> tuple[float | None, dict[str, float]] | None:
        return None if self.validator is None else self.validator()

    def _world(self) -> Comm:
        return self.dims.comm("world")

    def _agree(self, *flags: bool) -> list[bool]:
        """[stop signal, interrupt, *flags], each OR-ed over every rank: the step boundary's one collective."""
        signals = [False, False] if self.stop is None else [self.stop.requeue, self.stop.interrupted]
        return agree([*signals, *flags], self._world(), self.device)

    def _roll_back(self, step: int, loss: float) -> None:
        """Weights and optimizer state back to the newest good checkpoint before `step` (a loss spike);
        the step count, schedule and data position go on, so the batches since it are not replayed.
        Collective (every rank loads its part)."""
        self.wait_for_save()
        line = self.guard.spike_message(step, loss)
        root = self.run_dir / "checkpoints"
        target = newest_good(root, before=step)
        world = self._world()
        if world.size > 1:  # every rank loads the one rank 0 chose
            chosen = torch.tensor([-1 if target is None else step_of(target) or 0], dtype=torch.int64, device=self.device)
            world.broadcast(chosen)
            target = None if int(chosen.item()) < 0 else root / step_dir_name(int(chosen.item()))
        if target is None or self.guard.rollbacks >= MAX_ROLLBACKS:
            why = "no good checkpoint before it" if target is None else f"already rolled back {MAX_ROLLBACKS} times"
            raise DivergenceError(f"{line}; cannot roll back: {why}. Lower optim.lr or tighten optim.clip_grad.")
        load_checkpoint(target, self.model, self.optimizer, dims=self.dims)
        self.guard.rollbacks += 1
        self.sinks.info(f"{line}: rolled weights and optimizer back to {target}; going on at step {step + 1} with new "
                        f"batches (rollback {self.guard.rollbacks} of at most {MAX_ROLLBACKS})")

    def run(self) -> str:
        """Train to the end ('done'), to an exit-interval boundary ('exit'), or until a stop signal
        ('stopped': checkpointed at the step boundary every rank agreed on; 'interrupted': the same
        for SIGINT). Raises DivergenceError when the run diverges (trainer/divergence.py)."""
        cfg, t = self.cfg, self.cfg.train
        self.model.train()
        start_step = self.state.step
        heartbeat = Heartbeat(self.dims.rank, self.world_size)
        for p in self.phases:  # e.g. DPO's reference log-probs of the initial policy
            p.before_training()
        if self.state.step < t.steps:
            requeue, interrupt = self._agree()  # a signal during start-up: no step since the last checkpoint
            if requeue or interrupt:
                self.sinks.info(f"stop signal {self.stop.received or '(on another rank)'} before the first step: "  # type: ignore[union-attr]
                                f"nothing to checkpoint since step {self.state.step}; stopping")
                return "stopped" if requeue else "interrupted"
        while self.state.step < t.steps:
            step = self.state.step + 1
            heartbeat.beat(step)
            try:
                ended = self._step(start_step)
            except CollectiveError as e:
                # Name the rank(s) this one waited for. Any collective of the step can be the one a
                # hung peer leaves waiting: the update's, validation's, the stop agreement's or a
                # checkpoint's, so the whole step is covered, not only train_step.
                grace = min(10.0, cfg.parallel.timeout_s / 4)
                raise CollectiveError(f"{e}\n  at step {step}: {heartbeat.suspects(step, grace)}") from e
            if ended is not None:
                return ended
        self.wait_for_save()
        return "done"

    def _step(self, start_step: int) -> str | None:
        """One update and what follows it (metrics, validation, divergence, checkpoint, stop/exit checks).
        Returns 'stopped', 'interrupted' or 'exit' when the run ends here, None to go on."""
        cfg, t = self.cfg, self.cfg.train
        microbatches = next(self.train_batches)
        phase_metrics: dict[str, float] = {}
        for p in self.phases:  # before the policy's update (PPO: the critic's update on this batch)
            phase_metrics.update(p.before_step(self.state.step, microbatches))
        t0 = time.perf_counter()
        lr = lr_at(self.state.step, cfg.optim, t.steps)
        result = train_step(self.model, self.optimizer, self.objective, microbatches, lr=lr,
                            clip_grad=cfg.optim.clip_grad, precision=self.precision, device=self.device,
                            dims=self.dims)
        dt = time.perf_counter() - t0
        self.state.step += 1
        self.state.consumed_samples += t.global_batch_size
        step = self.state.step
        tokens_per_s = self.tokens_per_step / dt
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        metrics: dict[str, Any] = {
            "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
            "tflops": tflops, "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "step_time_s": dt, "loss_tokens": result.items, "consumed_samples": self.state.consumed_samples,
            "mem_gb": memory_gb(self.device), **result.metrics,
            **self.train_batches.metrics(),  # e.g. GRPO's rollout rewards
            **phase_metrics,
        }
        if result.skipped:
            metrics["skipped"] = True
            self.sinks.info(f"step {step}: non-finite gradient norm, update skipped")
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
            val = self._validate()
            metrics["val_loss"] = None if val is None else val[0]
            if val is not None:
                metrics.update({f"val_{k}": v for k, v in val[1].items()})
            if self.downstream is not None:
                metrics.update(self.downstream())
        if step == start_step + 1:  # after the first update every buffer exists
            report = memory_report(self.model, self.optimizer, self.device)
            metrics.update({f"mem_{k}_bytes": v for k, v in report.items()})
            self.sinks.info(format_report(report))
        guard = self.guard
        requeue, interrupt, nonfinite, spike = self._agree(*guard.local_flags(result.loss, result.grad_norm))
        guard.update(step, result.loss, nonfinite, spike)
        if spike:
            metrics["loss_spike"] = True
        self.sinks.log(step, metrics)
        if guard.diverged:  # no checkpoint: it would not be good
            self.wait_for_save()
            raise DivergenceError(guard.nonfinite_message(step, result.loss, result.grad_norm,
                                                          newest_good(self.run_dir / "checkpoints")))
        if spike and guard.action == "stop":
            self.wait_for_save()
            raise DivergenceError(f"{guard.spike_message(step, result.loss)}; stopped (train.loss_spike_action = "
                                  f"'stop') without a checkpoint of it: the newest good checkpoint is "
                                  f"{newest_good(self.run_dir / 'checkpoints')}")
        if spike and guard.action == "rollback":
            self._roll_back(step, result.loss)
        elif spike:
            self.sinks.info(guard.spike_message(step, result.loss))
        last = step == t.steps
        exiting = bool(t.exit_interval) and step % t.exit_interval == 0 and not last
        stopping = not last and (requeue or interrupt)
        interval = cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
        if interval or exiting or stopping or (last and cfg.checkpoint.save_at_end):
            health = guard.health(result.loss, result.grad_norm, weights_finite(self.model, self._world(), self.device))
            path = self._checkpoint(health)
            verb = "writing checkpoint in the background:" if cfg.checkpoint.async_save else "saved checkpoint"
            self.sinks.info(f"{verb} {path}" + ("" if health["good"] else " (not good: non-finite loss, gradient or weights)"))
        if stopping:
            self.wait_for_save()
            code = "code 75 for requeue, rerun to resume" if requeue else "code 130 (interrupted); rerun to resume"
            self.sinks.info(f"stop signal {self.stop.received or '(on another rank)'}: checkpointed "  # type: ignore[union-attr]
                            f"after step {step}; exiting with {code}")
            return "stopped" if requeue else "interrupted"
        if exiting:
            self.wait_for_save()
            self.sinks.info(f"exit interval: stopping cleanly after step {step}; rerun to resume")
            return "exit"
        return None
