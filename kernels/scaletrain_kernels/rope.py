"""Fused rotary embedding (rotate-half form, as scaletrain.nn.RotaryEmbedding): one program per
(token, head) row; cos/sin tables [positions, head_dim] with duplicated halves.

out = x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁). Because the halves of the tables are
equal, the gradient is the same rotation by the opposite angle: dx = dy·cos − rotate_half(dy)·sin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, d]; cos/sin [P, d]; positions [b, s] (int)."""
    c, s = cos[positions][:, :, None, :].to(x.dtype), sin[positions][:, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), dim=-1) * s


@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, pos_ptr, y_ptr, heads, sign, HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (token, head); int64: rows × head_dim may pass 2³¹
    token = row // heads
    pos = tl.load(pos_ptr + token).to(tl.int64)
    i = tl.arange(0, HALF)
    base = row * 2 * HALF
    x1 = tl.load(x_ptr + base + i).to(tl.float32)
    x2 = tl.load(x_ptr + base + HALF + i).to(tl.float32)
    c = tl.load(cos_ptr + pos * 2 * HALF + i).to(tl.float32)
    s = tl.load(sin_ptr + pos * 2 * HALF + i).to(tl.float32) * sign
    tl.store(y_ptr + base + i, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty))
    tl.store(y_ptr + base + HALF + i, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty))


@torch.library.custom_op("scaletrain_kernels::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, sign: float = 1.0
         ) -> torch.Tensor:
    """Rotate x [b, s, heads, d] (d a power of two ≥ 2) at `positions` [b, s]; sign −1 rotates back."""
    b, s, heads, d = x.shape
    if d & (d - 1):
        raise ValueError(f"fused rope needs a power-of-two head_dim, got {d}")
    xc = x.contiguous()
    y = torch.empty_like(xc)
    pos = positions.reshape(-1).to(torch.int32).contiguous()
    rope_kernel[(b * s * heads,)](xc, cos.contiguous(), sin.contiguous(), pos, y, heads, sign, HALF=d // 2)
    return y


@rope.register_fake
def _(x, cos, sin, positions, sign=1.0):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    _, cos, sin, positions, sign = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.sign = sign


def _backward(ctx, dy):
    cos, sin, positions = ctx.saved_tensors
    return rope(dy, cos, sin, positions, -ctx.sign), None, None, None, None


rope.register_autograd(_backward, setup_context=_setup)
