"""The sequence-classification head of reward models: hidden → num_labels scores per position.

Its weight is tiny ([num_labels, hidden]) and replicated over tp: every tp rank computes the same
scores from the replicated final hidden states, so the loss (and the gradient reaching the
hidden states) is replicated too. Under sequence parallelism the hidden states arrive
sequence-sharded and are gathered first; the gather's backward keeps this rank's slice of the
replicated gradient (`gather_from_sequence_replicated`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.nn.init import mark
from scaletrain.nn.linear import TPBound
from scaletrain.parallel.mappings import gather_from_sequence_replicated


class ScoreHead(TPBound):
    """y = x Wᵀ, W [num_labels, hidden] (HF's `score.weight`, no bias).

    Placement: input [b, s, h] replicated over tp ([b, s/tp, h] under SP); output [b, s, num_labels]
    replicated over tp. Weight: replicated; its gradient is identical on every tp rank.
    """

    def __init__(self, hidden: int, num_labels: int, *, init_std: float = 0.02, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = mark(nn.Parameter(torch.empty(num_labels, hidden, dtype=dtype)), "normal", init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_replicated(x, self.tp)
        return F.linear(x, self.weight)
