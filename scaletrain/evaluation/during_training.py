"""Downstream evaluation during training (`train.eval_tasks`): `scaletrain eval`'s tasks run at every
validation on the training model itself, in its layout, their metrics logged beside the validation loss
(console, metrics.jsonl, TensorBoard, wandb) as eval_<kind>_<file>_<metric>.

Tasks are read, checked and (generation tasks) rendered with the run's chat template up front
(scaletrain/prepare.py), so a bad file fails before anything is built. Collective: every rank runs every task.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch

from scaletrain.config.schema import RunConfig
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.distributed.dims import ParallelDims
from scaletrain.evaluation.runner import EvalOptions, answer_prompts, run_task
from scaletrain.evaluation.tasks import Task, parse_task
from scaletrain.trainer.precision import Precision


class DownstreamEval:
    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer, model: torch.nn.Module, dims: ParallelDims,
                 precision: Precision, device: torch.device) -> None:
        t = cfg.train
        self.tasks = [parse_task(spec, t.eval_task_limit or None) for spec in t.eval_tasks]
        for task in self.tasks:  # (checked in scaletrain/prepare.py already)
            if task.kind in ("answer", "refusal"):
                task.prompts = answer_prompts(task, tokenizer, cfg.posttrain.chat.template, t.seq_length,
                                              t.eval_max_new_tokens)
        self.cfg, self.tokenizer, self.model, self.dims = cfg, tokenizer, model, dims
        self.precision, self.device = precision, device
        self.options = EvalOptions(batch_size=t.micro_batch_size, max_new_tokens=t.eval_max_new_tokens)

    @staticmethod
    def key(task: Task, metric: str) -> str:
        stem = re.sub(r"[^0-9A-Za-z]+", "_", task.path.stem).strip("_")
        return f"eval_{task.kind}_{stem}_{metric}"

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        for task in self.tasks:
            metrics = run_task(task, self.model, self.dims, self.cfg, self.options, self.tokenizer,
                               self.cfg.posttrain.chat.template, self.precision, self.device)
            out.update({self.key(task, k): v for k, v in metrics.items() if isinstance(v, float)})
        out["eval_tasks_s"] = time.perf_counter() - t0
        return out
