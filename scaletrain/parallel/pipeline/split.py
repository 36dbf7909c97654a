"""Cutting the layer list into pipeline stages, outside the model (DESIGN rule 2).

Layers are divided into pp·vpp virtual stages of equal size; virtual stage j = v·pp + r is chunk v
of pipeline rank r (Megatron's interleaving). Rank r keeps only its layers, the input embedding
if it runs virtual stage 0, and the final norm and head if it runs the last one — plus, when the
embedding is tied to the head and those live on different ranks, a copy of the embedding on the
last rank whose gradient is summed with the first rank's (the embedding group). Parameter names
stay the full model's (`layers.17.mlp…`), so checkpoints and initialisation ignore the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scaletrain.distributed.dims import ParallelDims


def layer_layout(num_layers: int, pp: int, vpp: int) -> list[list[list[int]]]:
    """layout[pp_rank][chunk] = global layer indices of that chunk."""
    per_stage = num_layers // (pp * vpp)
    return [[list(range((v * pp + r) * per_stage, (v * pp + r + 1) * per_stage)) for v in range(vpp)]
            for r in range(pp)]


@dataclass
class StageChunk:
    """One virtual stage: the rank's module run over a slice of its blocks.

    Called like the model (`chunk(tokens, ...)`); when the schedule has set `input_tensor` (the
    activation received from the previous stage), that replaces the tokens.
    """

    module: Any  # a model-family module: cfg, embed, layers (ModuleDict), norm, head
    layer_keys: list[str]
    is_first: bool
    is_last: bool
    sequence_parallel: bool = False
    input_tensor: torch.Tensor | None = None

    def activation_shape(self, tokens: torch.Tensor, tp: int) -> tuple[int, int, int]:
        """Shape of the activation this chunk receives/sends for a microbatch of `tokens` [b, s]."""
        b, s = tokens.shape
        return (b, s // tp if self.sequence_parallel else s, self.module.cfg.hidden_size)

    def __call__(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        inputs = tokens if self.input_tensor is None else self.input_tensor
        return self.module(inputs, layer_keys=self.layer_keys, **kwargs)


def split_stages(model: Any, dims: ParallelDims, sequence_parallel: bool) -> list[StageChunk]:
    """Prune `model` in place to this pipeline rank's part; return its chunks in virtual-stage order.

    Run on a meta-device model (before materialisation), so no rank allocates layers it does not run.
    """
    cfg = model.cfg
    pp, vpp, r = dims.pp, dims.vpp, dims.pp_rank
    layout = layer_layout(cfg.num_layers, pp, vpp)[r]
    keep = {str(i) for chunk in layout for i in chunk}
    model.layers = torch.nn.ModuleDict({k: m for k, m in model.layers.items() if k in keep})
    first, last = r == 0, r == pp - 1
    tied_head = cfg.tie_embeddings and not cfg.num_labels  # a score head never reads the embedding
    if not first and not (last and tied_head):
        model.embed = None
    if not last:
        model.norm = None
        model.head = None
        model.score = None
    return [StageChunk(model, [str(i) for i in layer_keys], is_first=first and v == 0,
                       is_last=last and v == vpp - 1, sequence_parallel=sequence_parallel)
            for v, layer_keys in enumerate(layout)]


def mark_tied_embedding(model: Any, dims: ParallelDims) -> None:
    """Tag the two copies of a tied embedding that live on the first and last pipeline rank.

    Their gradients are summed over the embedding group; the last rank's copy is left out of the
    gradient norm so the shared weight counts once.
    """
    if dims.pp == 1 or not model.cfg.tie_embeddings or model.cfg.num_labels or model.embed is None:
        return
    model.embed.weight.pipeline_tied = True
    if dims.pp_rank == dims.pp - 1:
        model.embed.weight.pipeline_tied_copy = True
