"""The role vocabulary models are written in (DESIGN rule 1)."""

from scaletrain.nn.attention import CoreAttention
from scaletrain.nn.embedding import VocabParallelEmbedding
from scaletrain.nn.init import ParamSpec, init_parameters, mark, spec_of
from scaletrain.nn.linear import ColumnParallelLinear, RowParallelLinear
from scaletrain.nn.loss import cross_entropy_per_token
from scaletrain.nn.norm import RMSNorm
from scaletrain.nn.rope import RotaryEmbedding

__all__ = [
    "ColumnParallelLinear", "CoreAttention", "ParamSpec", "RMSNorm", "RotaryEmbedding", "RowParallelLinear",
    "VocabParallelEmbedding", "cross_entropy_per_token", "init_parameters", "mark", "spec_of",
]
