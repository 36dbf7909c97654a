"""Llama-family decoder written in the scaletrain.nn role vocabulary.

Covers Llama 2/3 (RoPE incl. Llama 3.1 scaling, GQA, SwiGLU, RMSNorm), Qwen2 (qkv bias), Qwen3
(per-head q/k RMSNorm) and Mistral shapes. The module tree is embed → layers[i] → norm → head, with global layer indices as
names, so a pipeline split can take a slice of `layers` outside the model (DESIGN rule 2).

The fused qkv weight is laid out per key/value group: for each kv head, its q heads, then its k,
then its v rows. A contiguous tp slice then holds whole groups.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from scaletrain.config.schema import ModelConfig
from scaletrain.nn import (
    ColumnParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    VocabParallelEmbedding,
    fused,
)
from scaletrain.nn.backend import Roles, roles
from scaletrain.nn.kv_cache import KVCache, LayerCache
from scaletrain.nn.moe import MoE, is_moe_layer
from scaletrain.nn.score import ScoreHead


class HeadNorm(RMSNorm):
    """RMSNorm over each head's last dim (Qwen3's q/k norms); the torch layer on either backend.

    Placement: input [b, s, heads/tp, head_dim], head-sharded over tp; weight [head_dim] replicated. Each
    tp rank normalises only its own heads, so the weight's gradient is a partial sum over tp:
    `parallelize` tags it (tp_partial_grad) for finalize_grads' all-reduce, with or without SP.
    """

    tp_partial_grad = True


class Attention(nn.Module):
    """Self-attention block body. Input/output [b, s, hidden] replicated over tp."""

    def __init__(self, cfg: ModelConfig, tp_size: int, dtype: torch.dtype | None, r: Roles) -> None:
        super().__init__()
        self.heads_per_partition = cfg.num_heads // tp_size
        self.kv_per_partition = cfg.num_kv_heads // tp_size
        self.q_per_kv = cfg.num_heads // cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.qkv = r.column(cfg.hidden_size, qkv_out, tp_size=tp_size, bias=cfg.qkv_bias,
                            init_std=cfg.init_std, dtype=dtype)
        self.proj = r.row(cfg.num_heads * cfg.head_dim, cfg.hidden_size, tp_size=tp_size,
                          init_std=out_std, dtype=dtype)
        self.core = r.attention(self.heads_per_partition, self.kv_per_partition, cfg.head_dim)
        self.q_norm: HeadNorm | None = None
        self.k_norm: HeadNorm | None = None
        if cfg.qk_norm:  # Qwen3
            self.q_norm = HeadNorm(cfg.head_dim, cfg.norm_eps, dtype=dtype)
            self.k_norm = HeadNorm(cfg.head_dim, cfg.norm_eps, dtype=dtype)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, position_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None, kv_cache: LayerCache | None = None) -> torch.Tensor:
        """kv_cache: incremental decoding — this call's keys/values are appended to the cached ones and
        attended to with them (attention_mask then is [b, 1, s_new, s_cached + s_new])."""
        qkv = self.qkv(x)  # full sequence even when x is sequence-sharded (SP gathers it)
        return self.proj(self.attend(qkv, rope, position_ids, attention_mask, kv_cache))

    def attend(self, qkv: torch.Tensor, rope: RotaryEmbedding, position_ids: torch.Tensor | None,
               attention_mask: torch.Tensor | None, kv_cache: LayerCache | None = None) -> torch.Tensor:
        """qkv output → rotary q, k → core attention: the region parallel.recompute_modules = ['core_attn']
        reruns in backward (keeping only its input, the qkv output)."""
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, self.kv_per_partition, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(b, s, self.heads_per_partition, self.head_dim)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, k, position_ids)
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)
        return self.core(q, k, v, attention_mask)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)); gate and up fused into one column-parallel GEMM."""

    fused_kernel = "swiglu"  # parallel.kernels name of the fused activation (scaletrain.nn.fused)

    def __init__(self, cfg: ModelConfig, tp_size: int, dtype: torch.dtype | None, r: Roles) -> None:
        super().__init__()
        self.use_fused = False
        self.gate_up = r.column(cfg.hidden_size, cfg.ffn_hidden_size, tp_size=tp_size, fused=2,
                                init_std=cfg.init_std, dtype=dtype)
        self.down = r.row(cfg.ffn_hidden_size, cfg.hidden_size, tp_size=tp_size,
                          init_std=cfg.init_std / math.sqrt(2 * cfg.num_layers), dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.activation(gate, up))

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) · up: the region parallel.recompute_modules = ['mlp_act'] recomputes."""
        if self.use_fused:
            return fused.swiglu(gate, up)
        return torch.nn.functional.silu(gate) * up


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(·))."""

    # Set by parallelize for blocks that precision.fp8_bf16_layers keeps out of FP8 (te backend).
    precision_override: Callable[[], contextlib.AbstractContextManager] | None = None

    def __init__(self, cfg: ModelConfig, tp_size: int, dtype: torch.dtype | None, r: Roles, index: int = 0) -> None:
        super().__init__()
        self.attn_norm = r.norm(cfg.hidden_size, cfg.norm_eps, dtype=dtype)
        self.attn = Attention(cfg, tp_size, dtype, r)
        self.mlp_norm = r.norm(cfg.hidden_size, cfg.norm_eps, dtype=dtype)
        # model.moe: a mixture of experts in the layers it names (global index), the dense SwiGLU elsewhere
        self.mlp: SwiGLU | MoE = MoE(cfg, tp_size, dtype, r) if is_moe_layer(cfg.moe, index) else SwiGLU(cfg, tp_size, dtype, r)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: LayerCache | None = None) -> torch.Tensor:
        with self.precision_override() if self.precision_override is not None else contextlib.nullcontext():
            x = x + self.attn(self.attn_norm(x), rope, position_ids, attention_mask, kv_cache)
            return x + self.mlp(self.mlp_norm(x))


class LlamaModel(nn.Module):
    """Decoder-only LM. forward(input_ids [b, s]) → logits [b, s, vocab/tp]; with model.num_labels > 0
    (reward models) scores [b, s, num_labels] instead, replicated over tp.

    Placement: input ids replicated over tp; logits full-sequence and vocabulary-sharded over tp.
    Under sequence parallelism the residual stream between the role layers is sequence-sharded.

    Parameters are created uninitialised; `scaletrain.nn.init_parameters` fills them from the seed.
    """

    # Set by parallelize (te backend, precision.fp8): the FP8 autocast factory.
    fp8_context: Callable[[], contextlib.AbstractContextManager] | None = None

    def __init__(self, cfg: ModelConfig, tp_size: int = 1, dtype: torch.dtype | None = None,
                 backend: str = "torch") -> None:
        super().__init__()
        self.cfg, self.backend = cfg, backend
        r = roles(backend)
        self.embed: VocabParallelEmbedding | None = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_size=tp_size,
                                            init_std=cfg.init_std, dtype=dtype)
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
            factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor, original_max_position=cfg.rope_original_max_position,
        )
        self.layers = nn.ModuleDict({str(i): Block(cfg, tp_size, dtype, r, i) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype)
        self.head: ColumnParallelLinear | None = None
        self.score: ScoreHead | None = None
        if cfg.num_labels:  # a reward model: scores per position instead of token logits
            self.score = ScoreHead(cfg.hidden_size, cfg.num_labels, init_std=cfg.init_std, dtype=dtype)
        elif not cfg.tie_embeddings:
            self.head = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, tp_size=tp_size,
                                             init_std=cfg.init_std, dtype=dtype)

    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, layer_keys: list[str] | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """inputs: token ids [b, s], embedded here, or hidden states [b, s(/tp), h] handed over by the
        previous pipeline stage. attention_mask: boolean [b, 1, s, s] (packing), or under context
        parallelism the batch's `nn.blockwise_attention.BlockwiseMask` (s is then this cp rank's share). layer_keys: the blocks to run (default: every block this module
        holds). After the model's last block the final norm and head run and logits come out —
        with a kv_cache (incremental decoding) for the last position only, [b, 1, vocab/tp];
        otherwise the hidden states do. A pipeline split (parallel/pipeline) prunes the module
        tree and chooses the keys; the model itself knows no stages.
        """
        # The one place FP8 is entered (te backend), and only for training forwards. Everything that runs
        # under no_grad — KV-cache decoding, rollouts, evaluation, reference log-probs — stays in bf16:
        # TE's FP8 GEMMs need token counts divisible by 8/16, which a decoding step ([b, 1] tokens) or an
        # evaluation row of any width does not have.
        if self.fp8_context is not None and torch.is_grad_enabled():
            with self.fp8_context():
                return self._forward(inputs, position_ids, attention_mask, layer_keys, kv_cache)
        return self._forward(inputs, position_ids, attention_mask, layer_keys, kv_cache)

    def _forward(self, inputs: torch.Tensor, position_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, layer_keys: list[str] | None,
                 kv_cache: KVCache | None = None) -> torch.Tensor:
        if inputs.is_floating_point():
            x = inputs
        else:
            assert self.embed is not None, "token ids reached a pipeline stage without the embedding"
            x = self.embed(inputs)  # in the compute dtype: so is the residual stream (norm outputs, SP, pp)
        keys = list(self.layers.keys()) if layer_keys is None else layer_keys
        for key in keys:
            x = self.layers[key](x, self.rope, position_ids, attention_mask,
                                 kv_cache.layer(key) if kv_cache is not None else None)
        if not keys or int(keys[-1]) != self.cfg.num_layers - 1:
            return x
        assert self.norm is not None, "the last block ran on a stage without the final norm"
        if kv_cache is not None:
            # Decoding reads the next token's logits only: skip the head over the prompt's positions
            # (at a 128k vocabulary that is most of the prompt pass's memory).
            x = x[:, -1:]
        x = self.norm(x)
        if self.score is not None:
            return self.score(x)
        if self.head is not None:
            return self.head(x)
        assert self.embed is not None, "tied output head needs the embedding on the last stage"
        return self.embed.logits(x)
