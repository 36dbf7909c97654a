"""Which attention kernel runs for which device and mask (nn/attention.attention_path), and that the CUDA
choices compute the CPU paths' numbers: flex_attention (eager, forward — torch's CPU flex has no
backward) and the fused prefix calls against the blockwise path and SDPA on the materialised mask, in
float64, for packed rows whole and under context parallelism. The TE backend's varlen (thd) inputs
are checked here; the TE kernel itself where CUDA and Transformer Engine exist (test_te_backend)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import scaletrain.nn.attention as attention_module
from scaletrain.data.packing import block_causal_mask
from scaletrain.nn.attention import CoreAttention, attention_path
from scaletrain.nn.blockwise_attention import (
    blockwise_attention,
    dense_mask,
    document_cu_seqlens,
    document_mask,
    prefix_attention,
)
from scaletrain.nn.flex_attention import flex_masked_attention
from scaletrain.parallel.context_parallel import context_parallel_mask, gathered_order, local_indices

# flex_attention eagerly on CPU (the reference run here) warns that it is not the fused kernel: expected.
pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]

DOCS = torch.tensor([[0] * 13 + [1] * 9 + [2] * 11 + [-1] * 7,
                     [3] * 40])  # three documents and padding; one document filling the row


def test_kernel_choice_per_device_and_mask():
    dense = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    packed = document_mask(DOCS)
    cp_packed = context_parallel_mask(40, 2, 0, DOCS, torch.device("cpu"))
    cp_plain = context_parallel_mask(40, 2, 1, None, torch.device("cpu"))
    table = {  # (mask, cp bound): (cuda, cpu)
        "no mask": ((None, False), ("sdpa_causal", "sdpa_causal")),
        "decoding / padded rows": ((dense, False), ("sdpa_mask", "sdpa_mask")),
        "packed rows": ((packed, False), ("flex", "sdpa_dense")),
        "packed rows under cp": ((cp_packed, True), ("flex", "blockwise")),
        "cp, unpacked": ((cp_plain, True), ("prefix", "blockwise")),
    }
    for name, ((mask, cp), (cuda, cpu)) in table.items():
        assert attention_path("cuda", mask, cp) == cuda, name
        assert attention_path("cpu", mask, cp) == cpu, name
    # Nothing on CUDA is left to SDPA on a materialised s × s packing mask.
    assert "sdpa_dense" not in {attention_path("cuda", m, cp) for (m, cp), _ in table.values()}


def test_described_masks_materialise_to_the_reference_masks():
    assert torch.equal(dense_mask(document_mask(DOCS), 40), block_causal_mask(DOCS))
    from scaletrain.parallel.context_parallel import attention_mask

    for rank in range(2):
        ref = attention_mask(40, 2, rank, DOCS)  # keys in gathered (rank) order
        ours = dense_mask(context_parallel_mask(40, 2, rank, DOCS, torch.device("cpu")), 40)  # sequence order
        assert torch.equal(ours[..., gathered_order(40, 2)], ref)


def _qkv(b: int, s: int, heads: int = 4, kv: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, s, n, d, dtype=torch.float64, generator=g) for n in (heads, kv, kv)]


def _sdpa(q, k, v, mask):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("packed", [True, False])
def test_flex_equals_blockwise_and_sdpa_float64(cp, packed):
    q, k, v = _qkv(2, 40)
    docs = DOCS if packed else None
    for rank in range(cp):
        mask = (document_mask(DOCS) if packed else None) if cp == 1 else context_parallel_mask(40, cp, rank, docs,
                                                                                               torch.device("cpu"))
        if mask is None:  # whole unpacked rows: plain causal, nothing described
            continue
        q_local = q if cp == 1 else q[:, local_indices(40, cp, rank)]
        ref = _sdpa(q_local, k, v, dense_mask(mask, 40))
        flex = flex_masked_attention(q_local, k, v, mask, compiled=False)
        blockwise = blockwise_attention(q_local, k, v, mask.segments, mask.q_doc, mask.k_doc, block=8)
        torch.testing.assert_close(flex, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(blockwise, ref, rtol=1e-12, atol=1e-12)
        if not packed:
            torch.testing.assert_close(prefix_attention(q_local, k, v, mask.segments), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("packed", [True, False])
def test_core_attention_on_the_cuda_paths_computes_the_cpu_paths_numbers(monkeypatch, packed):
    """CoreAttention's own wiring of the CUDA choices (key reordering, flex / prefix calls), run on CPU
    by making attention_path answer as on CUDA; cp's key gather is replaced by the full keys."""
    q, k, v = _qkv(2, 40)
    core = CoreAttention(4, 2, 8)
    docs = DOCS if packed else None
    masks = [context_parallel_mask(40, 2, r, docs, torch.device("cpu")) for r in range(2)]
    if packed:
        masks.append(document_mask(DOCS))
    for rank, mask in enumerate(masks):
        rows = slice(None) if mask.whole_rows else local_indices(40, 2, rank)
        # Keys handed over in gathered order, as after the cp all-gather (whole rows: sequence order).
        order = slice(None) if mask.whole_rows else gathered_order(40, 2)
        with torch.no_grad():
            cpu = core(q[:, rows], k[:, order], v[:, order], mask)
            monkeypatch.setattr(attention_module, "attention_path", lambda _d, m, cp: attention_path("cuda", m, cp))
            monkeypatch.setattr(attention_module, "flex_masked_attention",
                                lambda *a: flex_masked_attention(*a, compiled=False))
            cuda_paths = core(q[:, rows], k[:, order], v[:, order], mask)
            monkeypatch.undo()
        torch.testing.assert_close(cuda_paths, cpu, rtol=1e-12, atol=1e-12)


def test_dense_masks_on_cuda_expand_grouped_heads_for_the_fused_kernel(monkeypatch):
    """With a materialised mask, CUDA hands SDPA one key/value head per query head (no enable_gqa), the
    form its memory-efficient kernel takes; the values equal the grouped call's."""
    q, k, v = _qkv(2, 12)
    mask = block_causal_mask(torch.tensor([[0] * 5 + [1] * 7, [2] * 12]))
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q_, k_, v_, **kw):
        seen.append((k_.shape[1], kw.get("enable_gqa")))
        return real(q_, k_, v_, **kw)

    core = CoreAttention(4, 2, 8)
    ref = core(q, k, v, mask)
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    out = core(q, k, v, mask)
    monkeypatch.undo()
    assert seen == [(4, False)]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_varlen_boundaries_of_packed_rows():
    cu, longest = document_cu_seqlens(DOCS)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 13, 22, 33, 40, 80] and longest == 40
    # A document id that ends one row and starts the next is two sequences (rows never attend across).
    cu, longest = document_cu_seqlens(torch.tensor([[0, 0, 5, 5], [5, 5, 5, 1]]))
    assert cu.tolist() == [0, 2, 4, 7, 8] and longest == 3


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the compiled flex kernel)")
def test_cuda_flex_forward_and_backward_equal_sdpa():
    q, k, v = (t.float().cuda().requires_grad_() for t in _qkv(2, 40))
    grads = []
    for path in ("flex", "sdpa"):
        for t in (q, k, v):
            t.grad = None
        mask = document_mask(DOCS.cuda())
        out = flex_masked_attention(q, k, v, mask) if path == "flex" else _sdpa(q, k, v, dense_mask(mask, 40))
        out.backward(torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out))
        grads.append([out.detach()] + [t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Transformer Engine")
def test_te_varlen_packed_rows_equal_the_torch_backend():
    from scaletrain.nn.backend import te_importable

    if not te_importable()[0]:
        pytest.skip("needs Transformer Engine")
    from scaletrain.nn.te_backend import TECoreAttention

    q, k, v = (t.to("cuda", torch.bfloat16) for t in _qkv(2, 40, heads=4, kv=2, d=64))
    mask = document_mask(DOCS.cuda())
    te_out = TECoreAttention(4, 2, 64).cuda()(q, k, v, mask)
    ref = _sdpa(q.float(), k.float(), v.float(), dense_mask(mask, 40))
    real = (DOCS.cuda() >= 0)[..., None]  # padding rows differ by design (a causal run of their own)
    torch.testing.assert_close((te_out.float() * real), ref * real, rtol=2e-2, atol=2e-2)
