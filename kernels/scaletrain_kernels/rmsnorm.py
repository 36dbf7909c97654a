"""Fused RMSNorm: y = x · rsqrt(mean(x²) + eps) · w, one program per row, fp32 statistics.

Forward saves rstd (one float per row) instead of the normalised output; backward recomputes it:
dx = rstd · (dy·w − x̂ · mean(dy·w·x̂)), dw = Σ_rows dy · x̂. Backward runs a fixed number of programs
(a few per SM), each over a contiguous run of rows, accumulating its partial dw in registers: the
partials are [programs, H] fp32, summed after — not an [N, H] fp32 buffer as large as the activations.

A row is one block of next_power_of_2(H) elements; `launch_config` picks num_warps by that block size
(the usual Triton table, as Liger's and Unsloth's kernels use), so that at H = 8192 / 16384 a row's
values spread over 16 warps instead of spilling registers with the default 4. Offsets are int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch reference (what scaletrain.nn.RMSNorm computes)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(compute)).to(x.dtype)


# Rows one program handles in backward at least, and programs per SM: enough to fill the GPU, few
# enough that the [programs, H] partials stay small.
_MIN_ROWS_PER_PROGRAM = 4
_PROGRAMS_PER_SM = 4


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, num_warps, backward programs) for rows of n_cols elements."""
    block = triton.next_power_of_2(n_cols)
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    if device.type == "cuda":
        slots = _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:  # Triton's interpreter (tests): a few programs, so that partials are still summed
        slots = 4
    programs = max(1, min(slots, triton.cdiv(n_rows, _MIN_ROWS_PER_PROGRAM)))
    return block, num_warps, programs


@triton.jit
def rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, rows_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row_stride = n_cols.to(tl.int64)  # int64 whatever type the loop variable gets
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for row in range(first, last):
        offs = row * row_stride + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)  # this program's partial, summed below


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


@torch.library.custom_op("scaletrain_kernels::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x)
    y = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    block, num_warps, _ = launch_config(*x2.shape, x.device)
    rmsnorm_fwd_kernel[(x2.shape[0],)](x2, weight.contiguous(), y, rstd, x2.shape[1], eps, BLOCK=block, num_warps=num_warps)
    return y.view_as(x), rstd


@rmsnorm_fwd.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("scaletrain_kernels::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    x2, dy2 = _rows(x), _rows(dy)
    dx = torch.empty_like(x2)
    n_rows, n_cols = x2.shape
    block, num_warps, programs = launch_config(n_rows, n_cols, x.device)
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    rmsnorm_bwd_kernel[(programs,)](dy2, x2, weight.contiguous(), rstd, dx, partial, n_rows, n_cols, triton.cdiv(n_rows, programs),
                      BLOCK=block, num_warps=num_warps)
    return dx.view_as(x), partial.sum(0).to(weight.dtype)


@rmsnorm_bwd.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rmsnorm_bwd(dy.contiguous(), x, weight, rstd)
    return dx, dw, None


rmsnorm_fwd.register_autograd(_backward, setup_context=_setup)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm over the last dim (output in x's dtype; statistics in fp32)."""
    return rmsnorm_fwd(x, weight, eps)[0]
