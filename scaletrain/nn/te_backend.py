"""The `te` backend: the role vocabulary on NVIDIA Transformer Engine (CUDA only), and FP8.

Selected by `parallel.backend` (scaletrain.nn.backend); importing this module imports Transformer
Engine, so nothing else imports it unless te was chosen. Parameter names and logical shapes equal
the torch backend's (nn/linear.py, nn/norm.py), so checkpoints, HF maps and the seeded
initialisation do not know which backend trained a model:

- TEColumnParallelLinear / TERowParallelLinear subclass `te.pytorch.Linear` (parallel_mode column /
  row; TE itself runs the row all-reduce, or the reduce-scatter / all-gather under sequence
  parallelism); `weight` [out/tp, in] / [out, in/tp] and `bias` as in the torch backend. The fused
  gate/up weight is stored 2-D, [2·f/tp, h] (TE's layout), and seen as [2, f/tp, h] everywhere else:
  its ParamSpec carries that view, and state_dict / load_state_dict convert.
- TERMSNorm subclasses `te.pytorch.RMSNorm` (`weight` [h]).
- TECoreAttention wraps `te.pytorch.DotProductAttention` (flash / cuDNN fused attention) on this
  rank's heads, bshd layout; packed documents run as variable-length sequences (thd, cu_seqlens,
  padding_causal), and only decoding's small dense masks as TE's `arbitrary` mask.
- Transformer Engine's `_extra_state` (FP8 scaling metadata) is left out of state dicts: checkpoints
  stay backend-independent; under the delayed recipe the amax history restarts after a resume.

Sequence parallelism: TE gathers and scatters along the first dimension ([s, b, h]); our activations
are [b, s, h], so under SP the TE linears transpose around the call (a copy each way).

FP8: `fp8_context(cfg, group)` returns the one autocast the model's forward enters (forward only, as
TE requires; training forwards only — decoding, evaluation and other no_grad passes stay in bf16): recipe current (Float8CurrentScaling, TE ≥ 2.2), delayed (DelayedScaling) or blockwise
(Float8BlockScaling, TE ≥ 2.3 on sm90+), amax reduced over the tp×dp group of the pipeline stage.
`fp8_disabled()` keeps chosen blocks in bf16 (precision.fp8_bf16_layers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import transformer_engine.pytorch as te
from torch import nn

from scaletrain.config.schema import PrecisionConfig
from scaletrain.distributed.comm import Comm
from scaletrain.nn.blockwise_attention import BlockwiseMask, document_cu_seqlens
from scaletrain.nn.init import mark, store_fused_flat

_EXTRA = "_extra_state"


def _device() -> str:
    # Built under `with torch.device("meta")` for pipeline stages; TE takes the device as an argument.
    return "meta" if torch.empty(0).is_meta else "cuda"


def _drop_extra_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    state_dict.pop(prefix + _EXTRA, None)


def _empty_extra_state(state_dict: dict, prefix: str, *args) -> None:
    # An empty uint8 tensor is what TE itself stores when there is no FP8 state; set_extra_state skips it.
    state_dict.setdefault(prefix + _EXTRA, torch.empty(0, dtype=torch.uint8))


def _without_extra_state(module: nn.Module) -> None:
    module._register_state_dict_hook(_drop_extra_state)
    module._register_load_state_dict_pre_hook(_empty_extra_state)


class _TELinear(te.Linear):
    """Common part of the TE linears: late tp binding, SP transposes, state-dict hygiene."""

    binds_tp = True  # parallelize() binds the tp communicator (no TPBound base: TE's own module tree)
    te_deferred_init = True  # built on meta for pipeline stages: parallelize's materialize resets it
    parallel_mode_name = "column"

    def __init__(self, in_features: int, out_features: int, *, tp_size: int, bias: bool,
                 dtype: torch.dtype | None) -> None:
        super().__init__(in_features, out_features, bias=bias, tp_size=tp_size, tp_group=None,
                         parallel_mode=self.parallel_mode_name, sequence_parallel=False,
                         params_dtype=dtype, device=_device(),
                         init_method=lambda w: None)  # scaletrain.nn.init_parameters fills every weight
        self.sp = False
        _without_extra_state(self)

    def bind_tp(self, comm: Comm, sequence_parallel: bool) -> None:
        if comm.size != self.tp_size:
            raise ValueError(f"{type(self).__name__} was built for tp_size={self.tp_size}, bound to {comm.size}")
        if comm.size > 1:
            self.set_tensor_parallel_group(comm.group)
        self.sp = sequence_parallel and comm.size > 1
        self.sequence_parallel = self.sp  # TE reads this attribute in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.sp:
            return super().forward(x)
        return super().forward(x.transpose(0, 1).contiguous()).transpose(0, 1)


class TEColumnParallelLinear(_TELinear):
    """Column-parallel linear on Transformer Engine. Placement as nn.linear.ColumnParallelLinear:
    input replicated over tp ([b, s/tp, h] under SP), output [b, s, out/tp]."""

    parallel_mode_name = "column"

    def __init__(self, in_features: int, out_features: int, *, tp_size: int = 1, bias: bool = False,
                 fused: int = 1, init_std: float = 0.02, dtype: torch.dtype | None = None) -> None:
        if out_features % tp_size:
            raise ValueError(f"out_features = {out_features} is not divisible by tp_size = {tp_size}")
        super().__init__(in_features, fused * out_features, tp_size=tp_size, bias=bias, dtype=dtype)
        self.fused = fused  # (TE's own in_features / out_features attributes stay as TE set them)
        per = out_features // tp_size
        # TE holds [fused·out/tp, in]: this rank's rows of each fused part, one after the other —
        # exactly the torch backend's [fused, out/tp, in] flattened, so a view is the logical shape.
        view = (fused, per, in_features) if fused > 1 else None
        mark(self.weight, "normal", init_std, 1 if fused > 1 else 0, tp_size, view=view)
        if bias:
            mark(self.bias, "zeros", 0.0, 1 if fused > 1 else 0, tp_size, view=(fused, per) if fused > 1 else None)
        if fused > 1:
            store_fused_flat(self, fused)


class TERowParallelLinear(_TELinear):
    """Row-parallel linear on Transformer Engine: input [b, s, in/tp], output replicated over tp
    ([b, s/tp, out] under SP); TE runs the all-reduce (reduce-scatter under SP) and adds the bias after."""

    parallel_mode_name = "row"

    def __init__(self, in_features: int, out_features: int, *, tp_size: int = 1, bias: bool = False,
                 init_std: float = 0.02, dtype: torch.dtype | None = None) -> None:
        if in_features % tp_size:
            raise ValueError(f"in_features = {in_features} is not divisible by tp_size = {tp_size}")
        super().__init__(in_features, out_features, tp_size=tp_size, bias=bias, dtype=dtype)
        mark(self.weight, "normal", init_std, 1, tp_size)
        if bias:
            mark(self.bias, "zeros", 0.0)


class TERMSNorm(te.RMSNorm):
    """RMSNorm on Transformer Engine; the weight is replicated over tp (summed over tp under SP by
    finalize_grads, like the torch backend's)."""

    role = "norm"
    te_deferred_init = True

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype | None = None) -> None:
        super().__init__(hidden_size, eps=eps, device=_device(), dtype=dtype)
        mark(self.weight, "ones")
        _without_extra_state(self)


class TECoreAttention(nn.Module):
    """Causal attention through TE's DotProductAttention on this rank's heads. Placement as
    nn.attention.CoreAttention: q [b, s, heads/tp, d], k, v [b, s, kv/tp, d] → [b, s, heads/tp·d]."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        # Local head counts with tp_size 1: DotProductAttention does no communication of its own.
        self.dpa = te.DotProductAttention(num_heads, head_dim, num_gqa_groups=num_kv_heads, attention_dropout=0.0,
                                          qkv_format="bshd", attn_mask_type="causal")
        _without_extra_state(self.dpa)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: torch.Tensor | BlockwiseMask | None = None) -> torch.Tensor:
        """attention_mask: packed rows' `document_mask` — run as variable-length sequences (`thd`, one
        sequence per document, cu_seqlens; TE's fused kernels) — or a boolean [b, 1, s, s_kv], True
        where attention is allowed (decoding, padded rows: TE's `arbitrary` mask, whose True masks out)."""
        if attention_mask is None:
            return self.dpa(q, k, v)
        if isinstance(attention_mask, BlockwiseMask):
            if not attention_mask.whole_rows or attention_mask.q_doc is None:
                raise ValueError("the te backend runs packed rows without context parallelism only (te + cp is "
                                 "refused up front)")
            if "cu_seqlens" not in attention_mask.cache:  # once per microbatch, shared by its layers
                attention_mask.cache["cu_seqlens"] = document_cu_seqlens(attention_mask.q_doc)
            cu, longest = attention_mask.cache["cu_seqlens"]
            b, s = q.shape[:2]
            out = self.dpa(*(t.reshape(b * s, *t.shape[2:]).contiguous() for t in (q, k, v)), qkv_format="thd",
                           attn_mask_type="padding_causal", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)
            return out.reshape(b, s, -1)
        return self.dpa(q, k, v, attention_mask=~attention_mask, attn_mask_type="arbitrary")


# --- FP8 -------------------------------------------------------------------------------------------

def _autocast_fn() -> tuple[Callable[..., contextlib.AbstractContextManager], str, str]:
    """TE ≥ 2.9: te.autocast(recipe=, amax_reduction_group=); before: fp8_autocast(fp8_recipe=, fp8_group=)."""
    if hasattr(te, "autocast") and hasattr(te, "quantized_model_init"):
        return te.autocast, "recipe", "amax_reduction_group"
    return te.fp8_autocast, "fp8_recipe", "fp8_group"


def _support(name: str) -> tuple[bool, str]:
    for module in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            mod = __import__(module, fromlist=[name])
        except ImportError:
            continue
        fn = getattr(mod, name, None)
        if fn is not None:
            ok, reason = fn()
            return bool(ok), str(reason)
    return False, f"this Transformer Engine has no {name}()"


def build_recipe(cfg: PrecisionConfig):
    """The TE recipe object for precision.fp8_recipe; a clear error where the installed TE or GPU lacks it."""
    from transformer_engine.common import recipe as r

    ok, reason = _support("check_fp8_support")
    if not ok:
        raise RuntimeError(f"precision.fp8: this GPU cannot run FP8 ({reason}); set precision.fp8 = false.")
    fmt = {"hybrid": r.Format.HYBRID, "e4m3": r.Format.E4M3}[cfg.fp8_format]
    if cfg.fp8_recipe == "delayed":
        return r.DelayedScaling(margin=cfg.fp8_margin, fp8_format=fmt, amax_history_len=cfg.fp8_amax_history,
                                amax_compute_algo="max")
    if cfg.fp8_recipe == "current":
        if not hasattr(r, "Float8CurrentScaling"):
            raise RuntimeError("precision.fp8_recipe = 'current' needs Transformer Engine ≥ 2.2 "
                               "(Float8CurrentScaling); upgrade it or use 'delayed'.")
        return r.Float8CurrentScaling(fp8_format=fmt)
    if not hasattr(r, "Float8BlockScaling"):
        raise RuntimeError("precision.fp8_recipe = 'blockwise' needs Transformer Engine ≥ 2.3 (Float8BlockScaling).")
    ok, reason = _support("check_fp8_block_scaling_support")
    if not ok:
        raise RuntimeError(f"precision.fp8_recipe = 'blockwise' cannot run here ({reason}); use 'current'.")
    return r.Float8BlockScaling(fp8_format=r.Format.E4M3 if cfg.fp8_format == "e4m3" else fmt)


def fp8_context(cfg: PrecisionConfig, amax_group) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the FP8 autocast the model forward enters (amax reduced over `amax_group`)."""
    recipe = build_recipe(cfg)
    fn, recipe_kw, group_kw = _autocast_fn()
    return lambda: fn(enabled=True, **{recipe_kw: recipe, group_kw: amax_group})


def fp8_disabled() -> contextlib.AbstractContextManager:
    """Nested inside the FP8 autocast: this block computes in bf16."""
    fn, _, _ = _autocast_fn()
    return fn(enabled=False)
