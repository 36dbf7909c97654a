"""Vocabulary-parallel embedding: each tp rank holds a contiguous block of vocabulary rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.nn.init import mark
from scaletrain.nn.linear import TPBound
from scaletrain.parallel.mappings import reduce_from_tp, reduce_scatter_to_sequence


class VocabParallelEmbedding(TPBound):
    """Token ids → vectors, with the table split over tp along the vocabulary.

    Placement: input ids [b, s] replicated over tp; output [b, s, h] replicated over tp, or
    sequence-sharded [b, s/tp, h] under SP. Weight: sharded along dim 0 (this rank holds rows
    [tp_rank·V/tp, (tp_rank+1)·V/tp)); ids outside that block contribute zeros before the sum.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_size: int = 1,
                 init_std: float = 0.02, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_embeddings % tp_size:
            raise ValueError(f"vocabulary {num_embeddings} is not divisible by tp_size = {tp_size}")
        self.num_embeddings, self.embedding_dim, self.tp_size = num_embeddings, embedding_dim, tp_size
        self.rows_per_partition = num_embeddings // tp_size
        self.weight = mark(nn.Parameter(torch.empty(self.rows_per_partition, embedding_dim, dtype=dtype)),
                           "normal", init_std, 0, tp_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Output in the compute dtype: under autocast its dtype even where the table is fp32
        (precision.params = 'fp32'), so that the residual stream and its tp collectives are bf16."""
        if self.tp is None or self.tp.size == 1:
            return _compute_dtype(F.embedding(input_ids, self.weight))
        start = self.tp.rank * self.rows_per_partition
        outside = (input_ids < start) | (input_ids >= start + self.rows_per_partition)
        local = torch.where(outside, 0, input_ids - start)
        out = _compute_dtype(F.embedding(local, self.weight) * (~outside).unsqueeze(-1).to(self.weight.dtype))
        return reduce_scatter_to_sequence(out, self.tp) if self.sequence_parallel else reduce_from_tp(out, self.tp)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output head: x [b, s(/tp), h] → logits [b, s, V/tp] against this rank's rows."""
        return F.linear(self._column_input(x), self.weight)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x
