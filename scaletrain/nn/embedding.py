"""Vocabulary-parallel embedding: each tp rank holds a contiguous block of vocabulary rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.nn.init import mark


class VocabParallelEmbedding(nn.Module):
    """Token ids → vectors, with the table split over tp along the vocabulary.

    Placement: input ids replicated over tp; output replicated over tp. Weight: sharded along dim 0
    (rows [tp_rank·V/tp, (tp_rank+1)·V/tp)).
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
        return F.embedding(input_ids, self.weight)
