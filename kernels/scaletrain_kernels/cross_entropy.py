"""Fused (vocabulary-parallel) cross-entropy: row statistics and the logits gradient in Triton.

Each rank holds logits [N, V/tp]. `ce_stats` reads a row once per pass and returns the local max,
the sum of exp(x − local max) and the label's logit (0 where the label is another rank's);
combining them across tp (max, rescaled sum, label) happens in scaletrain.nn.loss with two
all-reduces. The backward kernel writes (softmax − one-hot) · grad from the logits and the global
statistics, so only the logits are kept for backward — not an fp32 softmax as large as them.

Offsets are int64: rows × local vocabulary passes 2³¹ already at micro-batch 3 × seq 8192 × 128256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def ce_stats_kernel(x_ptr, label_ptr, max_ptr, sum_ptr, lab_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row · n_cols passes 2³¹ at large batch × vocabulary
    base = row * n_cols
    label = tl.load(label_ptr + row)  # local index, or −1 when another rank holds it
    m = -float("inf")
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m = tl.maximum(m, tl.max(x, axis=0))
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        s += tl.sum(tl.exp(x - m), axis=0)
    safe = tl.maximum(label, 0)
    lab = tl.load(x_ptr + base + safe).to(tl.float32)
    lab = tl.where(label >= 0, lab, 0.0)
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    tl.store(lab_ptr + row, lab)


@triton.jit
def ce_grad_kernel(x_ptr, label_ptr, max_ptr, sum_ptr, g_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row · n_cols passes 2³¹ at large batch × vocabulary
    base = row * n_cols
    label = tl.load(label_ptr + row)
    m = tl.load(max_ptr + row)
    inv = 1.0 / tl.load(sum_ptr + row)
    g = tl.load(g_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - m) * inv - tl.where(cols == label, 1.0, 0.0)
        tl.store(dx_ptr + base + cols, (p * g).to(dx_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("scaletrain_kernels::ce_stats", mutates_args=())
def ce_stats(logits: torch.Tensor, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V_local]; local_labels [N] (−1: not on this rank) → (max, sum exp(x − max), label logit), fp32 [N]."""
    x = logits.contiguous()
    n = x.shape[0]
    out = [torch.empty(n, dtype=torch.float32, device=x.device) for _ in range(3)]
    ce_stats_kernel[(n,)](x, local_labels.to(torch.int64).contiguous(), *out, x.shape[1], BLOCK=BLOCK)
    return out[0], out[1], out[2]


@ce_stats.register_fake
def _(logits, local_labels):
    n = logits.shape[0]
    return tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("scaletrain_kernels::ce_grad", mutates_args=())
def ce_grad(logits: torch.Tensor, local_labels: torch.Tensor, global_max: torch.Tensor, global_sum: torch.Tensor,
            grad: torch.Tensor) -> torch.Tensor:
    """(softmax − one-hot) · grad per row, from the logits and the tp-global max and sum."""
    x = logits.contiguous()
    dx = torch.empty_like(x)
    ce_grad_kernel[(x.shape[0],)](x, local_labels.to(torch.int64).contiguous(), global_max.contiguous(),
                         global_sum.contiguous(), grad.to(torch.float32).contiguous(), dx, x.shape[1], BLOCK=BLOCK)
    return dx


@ce_grad.register_fake
def _(logits, local_labels, global_max, global_sum, grad):
    return torch.empty_like(logits)
