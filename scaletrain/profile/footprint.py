"""What one token costs in memory: the element sizes of a run and the bytes a transformer block and the
loss save for backward, per layout (tensor / sequence / context parallelism, recompute granularity). The
memory planner (profile/planner.py) multiplies these by tokens, layers and microbatches in flight.

Conventions (bytes per rank):
- Activations per token and layer are the tensors this implementation saves for backward (measured
  with saved-tensor hooks, see profile/activations.py), in the compute dtype — the residual stream and
  norm outputs too — except the RMSNorms' float32 working copies: per block the two norms' upcast input
  and normalised output and rstd; the attention's input, qkv output, rotated q and k, the kernel's copy
  of v, its output and log-sum-exp (flash attention: no s×s scores); the MLP's input, gate/up output,
  silu output and product. Tensor parallelism divides the head and FFN terms; sequence parallelism also
  divides the norm terms. Selective recomputation drops what its modules free ('core_attn': rotated
  q, k, the v copy, the log-sum-exp and under cp the gathered keys/values; 'mlp_act': the silu output;
  'norm': the float32 copies, keeping the input). Full recomputation keeps each block's input plus one
  block's activations during its backward.
  Context parallelism divides every per-token term by cp; each block also keeps the keys and values
  it all-gathered over cp (the whole sequence's, in the compute dtype) for its backward; attention
  under cp is blockwise, so no s/cp × s mask or score matrix is kept.
- The loss (last stage): bf16 logits are kept as they are, with a float32 log-sum-exp per token, and the
  float32 working set is one chunk of tokens (nn/loss.py); float32 logits keep their log-softmax. During
  the loss's backward the gradient of the logits (compute dtype) is live as well: counted as transient.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.schema import ModelConfig, RunConfig
from scaletrain.nn.loss import chunk_rows

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8, "fp8": 1}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int
    dp: int
    cp: int = 1
    sequence_parallel: bool = False
    zero: bool = False
    recompute: str = "none"
    recompute_modules: tuple[str, ...] = ()
    ep: int = 1  # expert parallelism: routed experts sharded over ep ranks taken from dp·cp

    @property
    def edp(self) -> int:
        """Expert-data-parallel ranks: those holding the same experts (their gradients and ZeRO-1 shards)."""
        return max(self.dp * self.cp // self.ep, 1)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp


@dataclass(frozen=True)
class Bytes:
    """Element sizes of a run: parameters, compute (activations), main (gradients, master weights)."""

    param: int
    compute: int
    main: int


def byte_sizes(cfg: RunConfig, compute_dtype: str | None = None) -> Bytes:
    """The element sizes a run uses (compute_dtype overrides the compute dtype, e.g. 'float32' for a
    CPU 'auto' run)."""
    dtype = cfg.precision.dtype
    if dtype == "float64":
        return Bytes(8, 8, 8)
    compute = compute_dtype or ("bfloat16" if dtype in ("bfloat16", "auto") else dtype)
    if compute != "bfloat16" and not cfg.precision.fp8:
        return Bytes(DTYPE_BYTES[compute], DTYPE_BYTES[compute], max(4, DTYPE_BYTES[compute]))
    # bf16 (FP8 GEMMs still save their inputs in bf16: TE keeps FP8 copies only of weights)
    return Bytes(4 if cfg.precision.params == "fp32" else 2, 2, 4)


def optimizer_bytes(params: int, b: Bytes, zero: bool, shards: int) -> int:
    """AdamW's state of `params` parameters on one rank. bf16 weights: fp32 master weights and two fp32
    moments; fp32/float64 weights: two moments in their dtype — under ZeRO-1 three fp32 values per parameter
    (master shard and moments) for 1/`shards` of them (the dp·cp ranks, or a routed expert's edp ranks)."""
    if b.param < b.main:
        return 3 * params * b.main // (shards if zero else 1)
    return 3 * params * 4 // shards if zero else 2 * params * b.param


def activation_bytes_per_layer(m: ModelConfig, layout: Layout, tokens: int, compute_bytes: int) -> int:
    """Bytes one block saves for backward for a microbatch of `tokens` tokens (see module docstring)."""
    h, d, t = m.hidden_size, m.head_dim, layout.tp
    nh, nkv, f = m.num_heads // t, m.num_kv_heads // t, m.ffn_hidden_size // t
    cb, cc = compute_bytes, max(4, compute_bytes)  # the norms compute in (at least) float32
    norm_div = t if layout.sequence_parallel else 1
    selective = set(layout.recompute_modules) if layout.recompute == "selective" else set()
    # Two RMSNorms: the upcast input, rstd and normalised output — or, recomputed, only the input.
    norms = 2 * (cb * h if "norm" in selective else 2 * cc * h + 4) // norm_div
    # Attention: input (all-gathered under SP), qkv output, rotated q and k, the kernel's v copy, the output
    # (the projection's input) and the log-sum-exp per head.
    attn = cb * (h + (nh + 2 * nkv) * d + (nh + nkv) * d + nkv * d + nh * d) + 4 * nh
    if "core_attn" in selective:
        attn -= cb * ((nh + nkv) * d + nkv * d) + 4 * nh
    # SwiGLU: input, fused gate/up output, silu(gate), and the product fed to the down projection.
    mlp = cb * (h + 4 * f - (f if "mlp_act" in selective else 0))
    # Context parallelism: `tokens` are this rank's; attention keeps the keys/values gathered over cp.
    gathered = 2 * nkv * d * cb * tokens * (layout.cp - 1) if layout.cp > 1 and "core_attn" not in selective else 0
    return tokens * (norms + attn + mlp) + gathered


def loss_bytes(m: ModelConfig, layout: Layout, tokens: int, b: Bytes, fused: bool = False) -> tuple[int, int]:
    """(saved, transient) bytes of the final norm, head input and loss on the last stage for `tokens` tokens.

    Saved: the final norm (as a block's), the head's input, and the loss's own — bf16 logits with a
    float32 log-sum-exp (chunked, or the fused kernel), or the float32 log-softmax — plus int64 labels and
    a mask. Transient: the gradient of the logits during the loss's backward, and the chunk's float32
    working set (nn/loss.py)."""
    h, t = m.hidden_size, layout.tp
    width = m.num_labels or m.vocab_size // t
    cc = max(4, b.compute)
    norm = (2 * cc * h + 4) // (t if layout.sequence_parallel else 1)
    chunked = (b.compute < 4 or fused) and not m.num_labels
    # Chunked: the logits themselves and a float32 log-sum-exp. Otherwise the float32 log-softmax (or softmax
    # under tp), and the logits, which the schedule holds until the backward has run.
    loss = b.compute * width + 4 if chunked else (cc + b.compute) * width
    saved = tokens * (norm + b.compute * h + loss + 9)
    if chunked:  # the logits' gradient, and one chunk's float32 copy and shifted copy
        return saved, tokens * b.compute * width + 2 * 4 * width * min(tokens, chunk_rows(width))
    return saved, tokens * 2 * cc * width  # the incoming gradient and the log-softmax's input gradient
