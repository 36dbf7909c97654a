"""DPO's reference log-probabilities: a phase run once before the first step.

The reference is the frozen starting policy. Its log-probs do not change during training, so they are
computed in one forward-only pass of the initial model over the data — through the same schedule and
parallel layout as training, by a recording objective that shares DPO's log-prob arithmetic — and
written to the run directory; a resumed run reads them back. (SimPO is reference-free: no phase.)
Every rank runs the pass over all pairs (the schedule's collectives need every rank); the last
pipeline stage records the values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scaletrain.checkpoint import CheckpointError
from scaletrain.data.loader import collate
from scaletrain.data.packing import model_inputs
from scaletrain.distributed.dims import ParallelDims
from scaletrain.stages.preference.dpo import DPOObjective, ReferenceTable
from scaletrain.trainer.contracts import Batch, LossFn, Objective, Phase
from scaletrain.trainer.precision import Precision
from scaletrain.trainer.step import prepare_batches, run_schedule

REFERENCE_FILE = "reference_logps.json"


class RecordLogProbs(Objective):
    """Forward-only: DPO's sequence log-probs of each pair's (chosen, rejected) rows, recorded by pair index."""

    name = "dpo_reference"

    def __init__(self, dpo: DPOObjective) -> None:
        self.dpo = dpo
        self.table: ReferenceTable = {}

    def prepare(self, batch: Batch) -> Batch:
        return self.dpo.prepare(batch)

    def count(self, batch: Batch) -> torch.Tensor:
        return self.dpo.count(batch)

    def forward_step(self, batch: Batch, model: torch.nn.Module) -> tuple[torch.Tensor, LossFn]:
        logits = model(batch["tokens"], **model_inputs(batch))

        def loss_fn(output: torch.Tensor):
            _, logps = self.dpo.sequence_logps(output, batch)
            n = batch["index"].numel()
            for i, c, r in zip(batch["index"].tolist(), logps[:n].tolist(), logps[n:].tolist()):
                self.table[i] = (c, r)
            return logps.sum() * 0, {}

        return logits, loss_fn


class ReferenceLogProbs(Phase):
    """before_training: fill `objective.reference` from run_dir/reference_logps.json, or compute it with the
    (initial) model and write it."""

    name = "reference_logps"

    def __init__(self, objective: DPOObjective, model: torch.nn.Module, datasets: list[Any], *, micro_batch: int,
                 run_dir: Path, dims: ParallelDims, precision: Precision, device: torch.device, resumed: bool,
                 log: Callable[[str], None]) -> None:
        self.objective, self.model, self.datasets, self.micro_batch = objective, model, datasets, micro_batch
        self.path, self.dims, self.precision, self.device = run_dir / REFERENCE_FILE, dims, precision, device
        self.resumed, self.log = resumed, log

    def before_training(self) -> None:
        path, dims = self.path, self.dims
        if path.exists():
            table = {int(k): (float(v[0]), float(v[1])) for k, v in json.loads(path.read_text()).items()}
            self.objective.reference.update(table)
            self.log(f"reference log-probs: {len(table)} pairs read from {path}")
            return
        if self.resumed:
            raise CheckpointError(f"{path} is missing: a resumed DPO run needs the reference log-probs of its first "
                                  "start (they cannot be recomputed from a trained policy); restore the file or start a "
                                  "new run directory")
        recorder, group, mb = RecordLogProbs(self.objective), dims.pp, self.micro_batch
        items = [item for ds in self.datasets if ds is not None for item in ds.items]
        self.model.eval()
        try:
            for start in range(0, len(items), mb * group):
                chunk = items[start:start + mb * group]
                mbs = prepare_batches(recorder, [collate(chunk[i:i + mb]) for i in range(0, len(chunk), mb)],
                                      self.device, dims)
                while len(mbs) % group:  # interleaved schedules need whole groups; repeats only overwrite
                    mbs.append(mbs[-1])
                with torch.no_grad(), self.precision.autocast():
                    run_schedule(recorder, mbs, self.model, dims, normaliser=1.0, forward_only=True)
        finally:
            self.model.train()
        self.objective.reference.update(recorder.table)
        last_stage = dims.pp_rank == dims.pp - 1
        if last_stage and dims.tp_rank == 0 and dims.dp_rank == 0 and dims.cp_rank == 0:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({str(k): list(v) for k, v in recorder.table.items()}))
            os.replace(tmp, path)
        if last_stage:
            self.log(f"reference log-probs: {len(recorder.table)} pairs computed with the initial model, saved to {path}")
