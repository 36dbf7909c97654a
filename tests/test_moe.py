"""The MoE block (nn/moe) against transformers' Mixtral / Qwen3-MoE blocks and hand-computed values; the
model.moe config section and its checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scaletrain.config.load import ConfigError, load_config
from scaletrain.config.moe import MoEConfig, is_moe_layer, moe_errors
from scaletrain.config.schema import ModelConfig
from scaletrain.models import build_model
from scaletrain.nn import init_parameters
from scaletrain.nn.backend import roles
from scaletrain.nn.moe import MoE, TopKRouter, capacity_keep, select_grouped_gemm

from conftest import TINY

pytestmark = pytest.mark.unit


def _cfg(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=96, hidden_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=6,
                       ffn_hidden_size=40, max_position_embeddings=64,
                       moe=MoEConfig(**{"num_experts": 6, "top_k": 2, **moe}))


def _block(dtype=torch.float64, seed=3, **moe) -> MoE:
    block = MoE(_cfg(**moe), 1, dtype, roles("torch"))
    init_parameters(block, seed)
    return block


def _hf(kind: str, block: MoE, norm_topk: bool):
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=24, intermediate_size=40, num_local_experts=6,
                                                 num_experts_per_tok=2))
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        hf = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=24, moe_intermediate_size=40, num_experts=6,
                                                   num_experts_per_tok=2, norm_topk_prob=norm_topk))
    with torch.no_grad():
        hf.gate.weight.copy_(block.router.weight)
        hf.experts.gate_up_proj.copy_(block.experts.gate_up.flatten(1, 2))  # [E, 2f, h]: gate rows, then up
        hf.experts.down_proj.copy_(block.experts.down)
    return hf


@pytest.mark.parametrize("kind,norm_topk", [("mixtral", True), ("qwen3_moe", False), ("qwen3_moe", True)])
def test_block_matches_transformers(kind, norm_topk):
    """Output and gradients of the routed block equal transformers' sparse MoE blocks (dropless, shapes
    not tuned: 6 experts, top-2, odd widths), in float32."""
    block = _block(torch.float32, norm_topk=norm_topk).eval()
    hf = _hf(kind, block, norm_topk)
    x = torch.randn(3, 7, 24, requires_grad=True)
    ours, ref = block(x), hf(x)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(ours)
    gx, gw = torch.autograd.grad(ours, [x, block.experts.gate_up], g)
    hx, hw = torch.autograd.grad(ref, [x, hf.experts.gate_up_proj], g)
    assert torch.allclose(gx, hx, atol=1e-6, rtol=1e-5)
    assert torch.allclose(gw.flatten(1, 2), hw, atol=1e-6, rtol=1e-5)


def test_aux_loss_is_megatron_form():
    """E·Σ f_e·P_e with f_e over the k·N assignments: transformers' load_balancing_loss_func divided by k."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    router = _block().router
    x = torch.randn(40, 24, dtype=torch.float64)
    r = router(x)
    hf = load_balancing_loss_func((torch.nn.functional.linear(x, router.weight),), 6, 2)
    assert abs(r.aux.item() * 2 - hf.item()) < 1e-6
    logits = torch.nn.functional.linear(x, router.weight)
    assert torch.allclose(r.z, torch.logsumexp(logits, -1).square().mean())
    assert r.counts.tolist() == torch.bincount(r.experts.reshape(-1), minlength=6).double().tolist()


def test_sigmoid_scores_and_selection_bias():
    """The bias chooses experts; the weights stay the (normalised) unbiased sigmoid scores."""
    router = TopKRouter(4, 4, 2, score_fn="sigmoid", norm_topk=True, with_bias=True, dtype=torch.float64)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4, dtype=torch.float64))
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0], dtype=torch.float64))
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    r = router(x)
    assert r.experts.tolist() == [[3, 0]]  # expert 3 only through its bias
    s = torch.sigmoid(torch.tensor([0.0, 3.0], dtype=torch.float64))
    assert torch.allclose(r.weights[0], s / s.sum())


def test_capacity_keeps_the_highest_weights_per_expert():
    experts = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    keep = capacity_keep(experts, weights, 3, capacity=2)
    # expert 0 has 4 assignments (0.6, 0.7, 0.5, 0.1): keeps 0.7 and 0.6; expert 1 has 0.4, 0.3, 0.9: keeps 0.9, 0.4
    assert keep.tolist() == [[True, True], [True, False], [False, True], [True, False]]


def test_dropped_assignments_pass_only_the_residual():
    """capacity_factor drops in training only; a dropped assignment adds nothing, evaluation is dropless."""
    block = _block(capacity_factor=0.5, aux_loss_coef=0.0)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    train = block.train()(x)
    assert (block.stats.vector(torch.device("cpu"))[6] > 0).item()  # something was dropped
    dropless = _block(aux_loss_coef=0.0).train()(x)
    assert not torch.allclose(train, dropless)
    with torch.no_grad():
        assert torch.allclose(block.eval()(x), dropless)


def test_balancing_terms_reach_the_router_gradient():
    """attach_loss: the router's gradient is that of output·g + scale·(aux_coef·aux + z_coef·z)·tokens."""
    block = _block(aux_loss_coef=0.3, z_loss_coef=0.05).train()
    block.loss_scale = 1 / 18
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    g = torch.randn(2, 9, 24, dtype=torch.float64)
    (block(x) * g).sum().backward()
    got = block.router.weight.grad.clone()
    block.zero_grad()
    block.loss_scale = 0.0
    r = block.router(x.reshape(-1, 24))
    (block(x) * g).sum().add((0.3 * r.aux + 0.05 * r.z) * 18 / 18).backward()
    assert torch.allclose(got, block.router.weight.grad, rtol=1e-12, atol=1e-14)


def test_moe_layers_follow_the_config():
    moe = MoEConfig(num_experts=4, layer_freq=2, first_dense_layers=2)
    assert [i for i in range(8) if is_moe_layer(moe, i)] == [3, 5, 7]
    cfg = dataclasses.replace(_cfg(), num_layers=4, moe=MoEConfig(num_experts=4, first_dense_layers=1))
    model = build_model(cfg)
    assert [type(b.mlp).__name__ for b in model.layers.values()] == ["SwiGLU", "MoE", "MoE", "MoE"]


def test_config_section_loads_nested_and_round_trips(tmp_path):
    cfg = load_config(TINY, ["model.moe.num_experts=8", "model.moe.score_fn=sigmoid", "parallel.ep=2"])
    assert cfg.model.moe.num_experts == 8 and cfg.model.moe.score_fn == "sigmoid" and cfg.parallel.ep == 2
    f = tmp_path / "run.toml"
    f.write_text(f'base = "{TINY}"\n[model.moe]\nnum_experts = 4\ntop_k = 1\n')
    assert load_config(f).model.moe == MoEConfig(num_experts=4, top_k=1)
    assert ModelConfig(**dataclasses.asdict(cfg.model)) == cfg.model  # a checkpoint's model_config
    with pytest.raises(ConfigError, match="unknown key 'model.moe.topk'. Did you mean 'model.moe.top_k'"):
        load_config(TINY, ["model.moe.topk=2"])
    with pytest.raises(ConfigError, match=r"'model.moe' must be a table \(\[model.moe\]\)"):
        load_config(TINY, ["model.moe=2"])


@pytest.mark.parametrize("moe,tp,ep,needle", [
    (MoEConfig(num_experts=6, top_k=7), 1, 1, "top_k = 7 must be between 1 and"),
    (MoEConfig(num_experts=6), 1, 4, "num_experts = 6 is not divisible by parallel.ep = 4"),
    (MoEConfig(num_experts=4, score_fn="relu"), 1, 1, "score_fn = 'relu': choose one of softmax, sigmoid"),
    (MoEConfig(num_experts=4, expert_ffn_hidden_size=30), 4, 1, "expert_ffn_hidden_size = 30 is not divisible"),
    (MoEConfig(num_experts=4, capacity_factor=-1.0), 1, 1, "capacity_factor = -1.0 must be 0 or more"),
    (MoEConfig(num_experts=4, first_dense_layers=4), 1, 1, "leave none of the 4 layers"),
    (MoEConfig(), 1, 2, "parallel.ep = 2 shards experts, and the model has none"),
])
def test_bad_moe_settings_are_named(moe, tp, ep, needle):
    errors = moe_errors(moe, num_layers=4, tp=tp, ep=ep, ffn_hidden_size=64)
    assert any(needle in e for e in errors), errors


def test_grouped_gemm_is_a_loop_off_cuda():
    impl, reason = select_grouped_gemm(torch.device("cpu"), torch.bfloat16)
    assert impl == "loop" and "CUDA-only" in reason
    block = _block()
    block.experts.impl = "grouped_mm"  # never faked: asked where it cannot run, it refuses
    with pytest.raises(RuntimeError, match="grouped_mm"):
        block(torch.randn(1, 4, 24, dtype=torch.float64))
    if hasattr(torch, "_grouped_mm"):  # the CUDA kernel's argument checks (dtypes, strides) run on meta tensors
        from scaletrain.nn.moe.experts import grouped_swiglu

        e, h, f = 4, 64, 48
        out = grouped_swiglu(torch.empty(40, h, device="meta"), torch.empty(e, 2, f, h, device="meta"),
                             torch.empty(e, h, f, device="meta"), torch.empty(e, dtype=torch.int32, device="meta"))
        assert out.shape == (40, h) and out.dtype == torch.bfloat16


def test_kv_cache_decoding_through_moe_blocks_equals_recomputation():
    """Greedy decoding with the KV cache gives the tokens of recomputing every prefix, and the logits of each
    incremental step equal the full forward's (float64, a MoE model with a shared expert and a capacity
    factor: decoding is dropless, so a token's experts do not depend on the other tokens of the pass)."""
    import reference_generate as reference

    from scaletrain.generation.turn import greedy_generate
    from scaletrain.nn.kv_cache import KVCache

    cfg = dataclasses.replace(_cfg(shared_ffn_hidden_size=16, capacity_factor=0.5, first_dense_layers=1),
                              vocab_size=96, init_std=0.3)
    model = build_model(cfg, dtype=torch.float64)
    init_parameters(model, 5)
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(1))
    free = reference.greedy_generate(model, ids, 10)
    assert torch.equal(greedy_generate(model, ids, 10), free) and free.shape == (3, 16)
    model.eval()
    with torch.no_grad():
        full = model(free)
        cache = KVCache(16)
        steps = [model(free[:, :6], kv_cache=cache)[:, -1]]
        for t in range(6, 16):
            mask = torch.ones(3, 1, 1, t + 1, dtype=torch.bool)  # the new token sees every cached one
            steps.append(model(free[:, t:t + 1], position_ids=torch.full((3, 1), t), attention_mask=mask,
                               kv_cache=cache)[:, -1])
    assert torch.allclose(torch.stack(steps[:-1], 1), full[:, 5:15], rtol=1e-12, atol=1e-12)
