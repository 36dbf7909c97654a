"""Index arithmetic of the fused kernels past 2³¹ elements, and RMSNorm's launch configuration.

int32 offsets (`row * n_cols`) wrap once rows × row length reaches 2³¹ — for the cross-entropy at
micro-batch 3 × seq 8192 × vocabulary 128256. Nothing that large is allocated here: Triton's
interpreter runs two programs whose ids are shifted to rows past 2³¹ / n_cols, on tensors reserved
(not touched) in virtual memory, with 2³¹ elements of padding in front — where wrapped int32 offsets
would land, so old arithmetic reads zeros and writes there instead of failing with a segfault.
Only the pages of the rows the programs touch are ever written. CPU only (the interpreter).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(torch.cuda.is_available(), reason="runs kernels in Triton's interpreter (CPU)")]

N_COLS = 1 << 16
FIRST = (1 << 31) // N_COLS + 1  # first row whose offset row · N_COLS is past 2³¹
PAD = 1 << 31


@contextmanager
def programs_from(first: int):
    """Program ids start at `first` instead of 0 (axis 0) in Triton's interpreter."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.create_get_program_id

    def shifted(axis: int):
        handle = original(axis)
        if axis == 0:
            handle = interpreter.TensorHandle((handle.data.astype(np.int64) + first).astype(np.int32), handle.dtype)
        return handle

    builder.create_get_program_id = shifted
    try:
        yield
    finally:
        del builder.create_get_program_id


@pytest.fixture(autouse=True)
def lazy_empty():
    """torch.empty must not touch its pages: deterministic mode (which an in-process `scaletrain train
    --set train.deterministic=true` leaves on) fills new memory with NaN — gigabytes here."""
    import torch.utils.deterministic as deterministic

    algorithms, fill = torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(False)
    deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(algorithms)
        deterministic.fill_uninitialized_memory = fill


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:  # not Linux: no check
        return 0.0


def reserved(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of `numel` elements preceded by PAD elements, in untouched virtual memory."""
    assert not torch.are_deterministic_algorithms_enabled()  # (lazy_empty) or every page gets written
    before = _rss_mib()
    probe = torch.empty(1 << 26, dtype=torch.uint8)  # 64 MiB: does torch.empty touch its pages here?
    if _rss_mib() - before > 32:
        pytest.skip("torch.empty writes the memory it allocates in this process; the test would need gigabytes")
    del probe
    try:
        storage = torch.empty(PAD + numel, dtype=dtype)
    except RuntimeError as e:  # a machine that refuses to overcommit
        pytest.skip(f"cannot reserve {PAD + numel} elements of virtual memory: {e}")
    return storage[PAD:]


def rows_at(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Rows FIRST and FIRST + 1 of a flat [rows · n_cols] tensor."""
    return t[FIRST * n_cols:(FIRST + 2) * n_cols].view(2, n_cols)


def test_cross_entropy_offsets_past_2_31():
    from scaletrain_kernels.cross_entropy import BLOCK, ce_grad_kernel, ce_stats_kernel

    g = torch.Generator().manual_seed(0)
    x = reserved((FIRST + 2) * N_COLS, torch.float16)
    rows = torch.randn(2, N_COLS, generator=g).half()
    rows_at(x, N_COLS).copy_(rows)
    labels = torch.zeros(FIRST + 2, dtype=torch.int64)
    labels[FIRST:] = torch.tensor([5, N_COLS - 1])
    m, s, lab = (torch.zeros(FIRST + 2) for _ in range(3))
    with programs_from(FIRST):
        ce_stats_kernel[(2,)](x, labels, m, s, lab, N_COLS, BLOCK=BLOCK)
    ref = rows.float()
    torch.testing.assert_close(m[FIRST:], ref.amax(-1))
    torch.testing.assert_close(s[FIRST:], (ref - ref.amax(-1, keepdim=True)).exp().sum(-1))
    torch.testing.assert_close(lab[FIRST:], ref[[0, 1], [5, N_COLS - 1]])

    dx = reserved((FIRST + 2) * N_COLS, torch.float16)
    grad = torch.zeros(FIRST + 2)
    grad[FIRST:] = torch.tensor([1.0, -2.0])
    with programs_from(FIRST):
        ce_grad_kernel[(2,)](x, labels, m, s, grad, dx, N_COLS, BLOCK=BLOCK)
    expected = (ref.softmax(-1) - torch.nn.functional.one_hot(torch.tensor([5, N_COLS - 1]), N_COLS)) * grad[FIRST:, None]
    torch.testing.assert_close(rows_at(dx, N_COLS).float(), expected, rtol=1e-3, atol=1e-6)


def test_rmsnorm_offsets_past_2_31():
    from scaletrain_kernels.rmsnorm import rmsnorm_bwd_kernel, rmsnorm_fwd_kernel, rmsnorm_ref

    g = torch.Generator().manual_seed(1)
    rows = torch.randn(2, N_COLS, generator=g).half()
    w = torch.randn(N_COLS, generator=g)
    x, y, dx = (reserved((FIRST + 2) * N_COLS, torch.float16) for _ in range(3))
    rows_at(x, N_COLS).copy_(rows)
    rstd = torch.zeros(FIRST + 2)
    with programs_from(FIRST):
        rmsnorm_fwd_kernel[(2,)](x, w, y, rstd, N_COLS, 1e-5, BLOCK=N_COLS)
    torch.testing.assert_close(rows_at(y, N_COLS), rmsnorm_ref(rows, w, 1e-5), rtol=2e-3, atol=2e-3)

    dy = reserved((FIRST + 2) * N_COLS, torch.float16)
    dy_rows = torch.randn(2, N_COLS, generator=g).half()
    rows_at(dy, N_COLS).copy_(dy_rows)
    partial = reserved((FIRST + 1) * N_COLS, torch.float32)  # program p writes its partial to row p
    with programs_from(FIRST):  # one row per program: program FIRST handles row FIRST
        rmsnorm_bwd_kernel[(1,)](dy, x, w, rstd, dx, partial, FIRST + 2, N_COLS, 1, BLOCK=N_COLS)
    xr = rows[:1].float().requires_grad_()
    wr = w.clone().requires_grad_()
    rmsnorm_ref(xr, wr, 1e-5).backward(dy_rows[:1].float())
    torch.testing.assert_close(rows_at(dx, N_COLS)[:1].float(), xr.grad, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(partial[FIRST * N_COLS:], wr.grad, rtol=2e-3, atol=2e-3)


def test_swiglu_offsets_past_2_31():
    from scaletrain_kernels.swiglu import BLOCK, swiglu_bwd_kernel, swiglu_fwd_kernel, swiglu_ref

    first = (1 << 31) // BLOCK + 1  # program ids past 2³¹ / BLOCK
    n = (first + 2) * BLOCK
    g = torch.Generator().manual_seed(2)
    gate, up, y = (reserved(n, torch.float16) for _ in range(3))
    gv, uv = torch.randn(2 * BLOCK, generator=g).half(), torch.randn(2 * BLOCK, generator=g).half()
    gate[first * BLOCK:].copy_(gv)
    up[first * BLOCK:].copy_(uv)
    with programs_from(first):
        swiglu_fwd_kernel[(2,)](gate, up, y, n, BLOCK=BLOCK)
    torch.testing.assert_close(y[first * BLOCK:], swiglu_ref(gv.float(), uv.float()).half(), rtol=2e-3, atol=2e-3)
    dy, dg, du = (reserved(n, torch.float16) for _ in range(3))
    dy[first * BLOCK:].fill_(1.0)
    with programs_from(first):
        swiglu_bwd_kernel[(2,)](dy, gate, up, dg, du, n, BLOCK=BLOCK)
    torch.testing.assert_close(du[first * BLOCK:], torch.nn.functional.silu(gv.float()).half(), rtol=2e-3, atol=2e-3)


def test_rope_offsets_past_2_31():
    from scaletrain_kernels.rope import rope_kernel, rope_ref

    d, heads = 128, 1
    first = (1 << 31) // d + 1  # (token, head) rows past 2³¹ / head_dim
    g = torch.Generator().manual_seed(3)
    x, y = (reserved((first + 2) * d, torch.float16) for _ in range(2))
    xv = torch.randn(1, 2, heads, d, generator=g).half()
    x[first * d:].copy_(xv.view(-1))
    angles = torch.arange(8.0)[:, None] * torch.logspace(0, -3, d // 2)[None]
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos(), emb.sin()
    positions = torch.empty(first + 2, dtype=torch.int32)  # untouched but for the two rows read
    positions[first:] = torch.tensor([3, 7], dtype=torch.int32)
    with programs_from(first):
        rope_kernel[(2,)](x, cos, sin, positions, y, heads, 1.0, HALF=d // 2)
    expected = rope_ref(xv.float(), cos, sin, torch.tensor([[3, 7]]))
    torch.testing.assert_close(y[first * d:].view(1, 2, heads, d).float(), expected, rtol=2e-3, atol=2e-3)


def test_rmsnorm_launch_config_follows_the_row_width():
    from scaletrain_kernels.rmsnorm import launch_config

    cpu = torch.device("cpu")
    warps = {h: launch_config(64, h, cpu)[1] for h in (96, 1024, 2048, 4096, 8192, 16384, 32768)}
    assert warps == {96: 4, 1024: 4, 2048: 8, 4096: 8, 8192: 16, 16384: 16, 32768: 32}
    assert launch_config(64, 8192, cpu)[0] == 8192 and launch_config(64, 96, cpu)[0] == 128
    # Backward: a few programs, each over a run of rows, not one per row.
    assert launch_config(10_000, 4096, cpu)[2] == 4
    assert launch_config(3, 4096, cpu)[2] == 1


def test_rmsnorm_backward_sums_per_program_partials():
    """Rows not a multiple of the programs' share; the weight gradient equals the reference's."""
    from scaletrain_kernels.rmsnorm import launch_config, rmsnorm, rmsnorm_ref

    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(37, 256, generator=g), torch.randn(256, generator=g)
    assert launch_config(37, 256, torch.device("cpu"))[2] == 4  # 10 rows per program, the last one 7
    dy = torch.randn(37, 256, generator=g)
    grads = []
    for fn in (rmsnorm, rmsnorm_ref):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(xi, wi, 1e-5).backward(dy)
        grads.append((xi.grad, wi.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
