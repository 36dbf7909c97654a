"""The DPO-family objective, and its reference log-probabilities computed once before training.

A microbatch of M pairs runs as one forward of 2M rows (chosen rows, then rejected rows); sequence
log-probs come from the vocab-parallel per-token loss over the response masks, so the vocabulary is
never gathered (under context parallelism each rank's partial sums are summed over cp first). The
loss (stages/preference/losses.py) is summed over pairs and normalised by the global pair count
like every objective. Only the last pipeline stage evaluates loss_fn, so only it
needs the reference values.

Reference: the frozen starting policy. Its log-probs do not change during training, so they are
computed in one forward-only pass of the initial model over the data — through the same schedule
and parallel layout — before the first step, and written to the run directory; a resumed run reads
them back. (SimPO is reference-free and skips the pass.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from scaletrain.data.packing import model_inputs
from scaletrain.distributed.comm import Comm
from scaletrain.nn import cross_entropy_per_token
from scaletrain.stages.preference.losses import LENGTH_NORMALISED, preference_loss, sequence_logprobs

REFERENCE_FILE = "reference_logps.json"
METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")


class DPOObjective:
    name = "dpo"
    metrics = METRICS  # logged per step (means over pairs) next to the loss

    def __init__(self, tp: Comm | None, loss_type: str, beta: float, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, fused_cross_entropy: bool = False, nll_weight: float = 0.0,
                 cp: Comm | None = None) -> None:
        self.tp, self.loss_type, self.beta, self.nll_weight = tp, loss_type, beta, nll_weight
        self.cp = cp  # context parallelism: each rank holds part of every row's tokens
        self.label_smoothing, self.simpo_gamma, self.fused = label_smoothing, simpo_gamma, fused_cross_entropy
        self.reference: dict[int, tuple[float, float]] = {}
        self.recording: dict[int, tuple[float, float]] | None = None  # set during the reference pass

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """M pairs → one model input of 2M rows: the chosen rows, then the rejected rows."""
        return {"tokens": torch.cat([batch["chosen_tokens"], batch["rejected_tokens"]]),
                "labels": torch.cat([batch["chosen_labels"], batch["rejected_labels"]]),
                "response_mask": torch.cat([batch["chosen_mask"], batch["rejected_mask"]]),
                "index": batch["index"]}

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["index"].numel(), device=batch["index"].device)

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        logits = model(batch["tokens"], **model_inputs(batch))
        labels, mask, index = batch["labels"], batch["response_mask"], batch["index"]

        def loss_fn(output: torch.Tensor):
            per_token = cross_entropy_per_token(output, labels, self.tp, fused=self.fused)
            logps = sequence_logprobs(per_token, mask, self.loss_type in LENGTH_NORMALISED, cp=self.cp)
            n = index.numel()
            chosen, rejected = logps[:n], logps[n:]
            if self.recording is not None:
                for i, c, r in zip(index.tolist(), chosen.tolist(), rejected.tolist()):
                    self.recording[i] = (c, r)
                return logps.sum() * 0, {}
            ref_c = ref_r = None
            if self.needs_reference:
                try:
                    ref = [self.reference[i] for i in index.tolist()]
                except KeyError as e:
                    raise RuntimeError(f"no reference log-prob for pair {e}; the reference pass did not cover it") from e
                ref_t = torch.tensor(ref, dtype=logps.dtype, device=logps.device)
                ref_c, ref_r = ref_t[:, 0], ref_t[:, 1]
            losses, metrics = preference_loss(self.loss_type, chosen, rejected, ref_c, ref_r, beta=self.beta,
                                              label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
            if self.nll_weight:  # RPO: the chosen response's mean token NLL keeps it likely
                losses = losses - self.nll_weight * sequence_logprobs(per_token[:n], mask[:n], True, cp=self.cp)
            return losses.sum(), {k: metrics[k].sum() for k in METRICS}

        return logits, loss_fn


def reference_logps(objective: DPOObjective, model: torch.nn.Module, datasets: list, *, micro_batch: int,
                    run_dir: Path, dims, precision, device: torch.device, resumed: bool, log) -> None:
    """Fill objective.reference: read run_dir/reference_logps.json, or compute it with the (initial)
    model through the run's own schedule and write it. Every rank runs the pass over all pairs (the
    schedule's collectives need every rank); the last pipeline stage records the values."""
    from scaletrain.data.loader import collate
    from scaletrain.trainer.step import prepare_batches, run_schedule

    path = run_dir / REFERENCE_FILE
    if path.exists():
        objective.reference = {int(k): tuple(v) for k, v in json.loads(path.read_text()).items()}  # type: ignore[misc]
        log(f"reference log-probs: {len(objective.reference)} pairs read from {path}")
        return
    if resumed:
        from scaletrain.checkpoint import CheckpointError

        raise CheckpointError(f"{path} is missing: a resumed DPO run needs the reference log-probs of its first "
                              "start (they cannot be recomputed from a trained policy); restore the file or start a "
                              "new run directory")
    pp = dims.pp if dims is not None else 1
    group = max(pp, 1)
    items = [item for ds in datasets if ds is not None for item in ds.items]
    objective.recording = {}
    model.eval()
    try:
        for start in range(0, len(items), micro_batch * group):
            chunk = items[start:start + micro_batch * group]
            mbs = prepare_batches(objective, [collate(chunk[i:i + micro_batch]) for i in
                                              range(0, len(chunk), micro_batch)], device, dims)
            while len(mbs) % group:  # interleaved schedules need whole groups; repeats only overwrite
                mbs.append(mbs[-1])
            with torch.no_grad(), precision.autocast():
                run_schedule(objective, mbs, model, dims, normaliser=1.0, forward_only=True)
    finally:
        model.train()
    recorded, objective.recording = objective.recording, None
    objective.reference = recorded
    last_stage = dims is None or dims.pp_rank == dims.pp - 1
    if last_stage and (dims is None or (dims.tp_rank == 0 and dims.dp_rank == 0 and dims.cp_rank == 0)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(k): list(v) for k, v in recorded.items()}))
        os.replace(tmp, path)
    if last_stage:
        log(f"reference log-probs: {len(recorded)} pairs computed with the initial model, saved to {path}")

