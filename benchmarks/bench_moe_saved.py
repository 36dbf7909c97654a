"""Bytes one MoE layer saves for its backward, per token, measured with saved-tensor hooks.

    python benchmarks/bench_moe_saved.py [--tokens 512] [--hidden 128] [--experts 32] [--top-k 8] [--ffn 48]

A Qwen3-MoE-like block (softmax scores, top-k weights renormalised, no shared expert, dropless) in training
mode; its forward runs under `profile/activations.saved_activation_bytes` (every tensor autograd keeps,
each storage once, weights and the block's input excluded) in float32 and in bf16, and the total is divided by the tokens. The
planner's per-token figure for the same layer (`profile/moe_plan.moe_activation_delta` plus the dense MLP's
4·ffn it replaces) is printed beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaletrain.config.moe import MoEConfig  # noqa: E402
from scaletrain.config.schema import ModelConfig  # noqa: E402
from scaletrain.nn import init_parameters  # noqa: E402
from scaletrain.nn.backend import roles  # noqa: E402
from scaletrain.nn.moe import MoE  # noqa: E402
from scaletrain.profile.activations import saved_activation_bytes  # noqa: E402
from scaletrain.profile.footprint import Layout  # noqa: E402
from scaletrain.profile.moe_plan import moe_activation_delta  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=48)
    a = ap.parse_args()
    moe = MoEConfig(num_experts=a.experts, top_k=a.top_k, expert_ffn_hidden_size=a.ffn, norm_topk=True)
    m = ModelConfig(vocab_size=64, hidden_size=a.hidden, num_layers=1, num_heads=4, num_kv_heads=4,
                    head_dim=a.hidden // 4, ffn_hidden_size=a.ffn, moe=moe)
    print(f"MoE layer h={a.hidden} E={a.experts} top-{a.top_k} f_e={a.ffn}, {a.tokens} tokens, torch {torch.__version__}")
    for dtype in (torch.float32, torch.bfloat16):
        block = MoE(m, 1, dtype, roles("torch")).train()
        init_parameters(block, 0)
        x = torch.randn(1, a.tokens, a.hidden, dtype=dtype, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        _, saved = saved_activation_bytes(lambda b=block, x=x: b(x), [x, *block.parameters()])  # the input is the previous norm's
        cb = torch.finfo(dtype).bits // 8
        layout = Layout(tp=1, pp=1, vpp=1, dp=1)
        planned = moe_activation_delta(m, layout, a.tokens, cb, [0]) + a.tokens * 4 * a.ffn * cb
        print(f"{str(dtype).removeprefix('torch.'):>9}: saved {saved / a.tokens:8.1f} B/token   "
              f"planned {planned / a.tokens:8.1f} B/token")


if __name__ == "__main__":
    main()
