"""Qwen3-MoE and Mixtral through `scaletrain convert` both ways and checkpoint.init_from_hf, proven against
transformers on models built here with odd shapes (5 experts, GQA, head_dim ≠ hidden/heads, a leading dense
layer, tied and untied embeddings, top-k renormalised or not)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from scaletrain.checkpoint.hf import load_full_model
from scaletrain.cli import main
from scaletrain.models.llama.hf import UnsupportedModelError, config_from_hf

from hf_helpers import (
    assert_round_trip,
    assert_same_logits_and_greedy,
    hf_first_batch_loss,
    patch_hf_float64,
    resave_in_layout,
    run_mixtral_router_in_float64,
)

pytestmark = pytest.mark.parity

transformers = pytest.importorskip("transformers")

VOCAB = 97
ATTN = dict(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
            max_position_embeddings=96, bos_token_id=1, eos_token_id=2)
CASES = {  # name: (class, config)
    "qwen3_moe": ("Qwen3MoeForCausalLM", lambda: transformers.Qwen3MoeConfig(
        **ATTN, head_dim=12, intermediate_size=52, moe_intermediate_size=20, num_experts=5, num_experts_per_tok=3,
        norm_topk_prob=True, mlp_only_layers=[0], rms_norm_eps=1e-6, router_aux_loss_coef=0.003,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3_moe_tied": ("Qwen3MoeForCausalLM", lambda: transformers.Qwen3MoeConfig(
        **ATTN, head_dim=12, intermediate_size=52, moe_intermediate_size=20, num_experts=5, num_experts_per_tok=2,
        norm_topk_prob=False, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "mixtral": ("MixtralForCausalLM", lambda: transformers.MixtralConfig(
        **ATTN, intermediate_size=36, num_local_experts=5, num_experts_per_tok=2, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mixtral_tied": ("MixtralForCausalLM", lambda: transformers.MixtralConfig(
        **ATTN, head_dim=8, intermediate_size=36, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
        tie_word_embeddings=True, router_aux_loss_coef=0.02)),
}


def _source(tmp_path, name: str, vocab: int = VOCAB):
    """A random transformers MoE model saved to a directory; norms randomised so their map is really tested."""
    cls, make = CASES[name]
    config = make()
    config.vocab_size = vocab
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key:
                p.add_(torch.randn_like(p) * 0.2)
    out = tmp_path / name
    model.save_pretrained(out)
    return out, model


def _convert(*args: str) -> None:
    assert main(["convert", *args]) == 0


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_exact_and_keeps_every_config_field(tmp_path, name):
    hf_dir, hf = _source(tmp_path, name)
    assert_round_trip(tmp_path, hf_dir, hf, ".experts.")
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # float32, transformers' own code unpatched: the same logits up to rounding.
        _cfg, ours = load_full_model(tmp_path / "ckpt")
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_float64_logits_match_transformers(tmp_path, monkeypatch, name):
    hf_dir, hf = _source(tmp_path, name)
    hf = hf.double()
    hf.config._attn_implementation = "eager"
    hf.config._experts_implementation = "eager"  # a loop over experts: torch._grouped_mm has no float64
    _convert("from-hf", str(hf_dir), str(tmp_path / "ckpt"), "--dtype", "float64")
    cfg, ours = load_full_model(tmp_path / "ckpt", torch.float64)
    assert cfg.moe.num_experts == hf.config.to_dict().get("num_experts", hf.config.to_dict().get("num_local_experts"))
    patch_hf_float64(monkeypatch, hf, ours)
    run_mixtral_router_in_float64(hf)
    assert_same_logits_and_greedy(ours, hf, VOCAB, (3, 23), 12)


def test_moe_fields_map_both_ways():
    qwen = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 24,
            "moe_intermediate_size": 4, "num_hidden_layers": 4, "num_attention_heads": 2, "head_dim": 4,
            "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": False, "decoder_sparse_step": 2,
            "mlp_only_layers": [0, 1], "router_aux_loss_coef": 0.01}
    cfg = config_from_hf(qwen)
    assert cfg.qk_norm and cfg.ffn_hidden_size == 24
    m = cfg.moe
    assert (m.num_experts, m.top_k, m.norm_topk, m.expert_ffn_hidden_size, m.layer_freq, m.first_dense_layers,
            m.aux_loss_coef, m.score_fn) == (6, 2, False, 4, 2, 2, 0.01, "softmax")
    with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
        config_from_hf({**qwen, "mlp_only_layers": [1]})
    with pytest.raises(UnsupportedModelError, match="no layer"):
        config_from_hf({**qwen, "mlp_only_layers": [0, 1, 2, 3]})
    mixtral = {"architectures": ["MixtralForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 12,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_local_experts": 3, "num_experts_per_tok": 2}
    m = config_from_hf(mixtral).moe
    assert (m.num_experts, m.top_k, m.norm_topk, m.expert_ffn_hidden_size) == (3, 2, True, 12)
    with pytest.raises(UnsupportedModelError, match="router_jitter_noise"):
        config_from_hf({**mixtral, "router_jitter_noise": 0.1})
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        config_from_hf({**mixtral, "sliding_window": 4096})


def test_what_an_hf_class_cannot_express_is_refused_on_export():
    import dataclasses

    from scaletrain.models.llama.hf import config_to_hf

    base = config_from_hf({"architectures": ["MixtralForCausalLM"], "vocab_size": 8, "hidden_size": 8,
                           "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "num_local_experts": 3, "num_experts_per_tok": 2})
    ids = dict(bos_id=None, eos_id=None, dtype="float32")
    assert config_to_hf(base, **ids)["num_local_experts"] == 3
    for change, match in ((dict(score_fn="sigmoid"), "score_fn"), (dict(shared_ffn_hidden_size=4), "shared expert"),
                          (dict(bias_update_rate=1e-3), "aux-loss-free"), (dict(norm_topk=False), "norm_topk")):
        bad = dataclasses.replace(base, moe=dataclasses.replace(base.moe, **change))
        with pytest.raises(UnsupportedModelError, match=match):
            config_to_hf(bad, **ids)
    dense = dataclasses.replace(base, moe=dataclasses.replace(base.moe, num_experts=0))
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        config_to_hf(dense, **ids)


def test_export_without_a_source_config(tmp_path):
    """A run trained from scratch (no HF source): the mapping alone writes a config transformers loads as the
    same MoE architecture (no missing or unexpected keys, the same logits)."""
    for name in ("qwen3_moe", "mixtral"):
        hf_dir, hf = _source(tmp_path, name)
        _convert("from-hf", str(hf_dir), str(tmp_path / f"ckpt-{name}"))
        state_file = tmp_path / f"ckpt-{name}" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        state.pop("hf_config"), state.pop("hf_generation_config")
        state_file.write_text(json.dumps(state))
        _convert("to-hf", str(tmp_path / f"ckpt-{name}"), str(tmp_path / f"export-{name}"))
        reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"export-{name}"),
                                                                           output_loading_info=True)
        assert type(reloaded) is type(hf) and not info["missing_keys"] and not info["unexpected_keys"]
        ids = torch.randint(0, VOCAB, (2, 9))
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("name,ep", [("qwen3_moe", 1), ("mixtral", 1), ("mixtral_tied", 2)])  # 4 experts at ep2
def test_train_from_moe_weights(tmp_path, tokenizer_dir, dataset_prefix, name, ep):
    """checkpoint.init_from_hf with a MoE directory: the first step's loss is transformers' loss on that batch —
    also at ep2, where each rank copies only its experts' slice of the HF tensors."""
    from scaletrain.checkpoint.hf import checkpoint_model_config

    from conftest import TINY, read_metrics, tiny_overrides

    cls, make = CASES[name]
    config = make()
    config.vocab_size = 512
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    args = ["train", "--config", TINY]
    for item in tiny_overrides(tmp_path / "run", tokenizer_dir, dataset_prefix, **{
            "checkpoint.init_from_hf": str(tmp_path / "hf"), "train.steps": 1, "optim.warmup_steps": 0,
            "parallel.ep": ep}):
        args += ["--set", item]
    if ep == 1:
        assert main(args) == 0
    else:
        from dist_harness import cli_rank, run_ranks

        assert run_ranks(ep, cli_rank, args, timeout=240) == [0] * ep
    got = checkpoint_model_config(tmp_path / "run" / "checkpoints" / "step_0000001")
    assert got.moe.num_experts == config.num_local_experts and got.hf_architecture == cls
    ref = hf_first_batch_loss(hf, dataset_prefix)
    assert abs(read_metrics(tmp_path / "run")[0]["loss"] - ref) <= 1e-5 * ref


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_export_from_a_tp2_checkpoint_is_bit_exact(tmp_path, name):
    """HF → scaletrain → saved again at tp2 (each rank its slice of every expert) → HF: the same tensors."""
    from dist_harness import run_ranks

    hf_dir, hf = _source(tmp_path, name, vocab=96)  # tp2 splits the vocabulary
    _convert("from-hf", str(hf_dir), str(tmp_path / "ckpt"))
    assert all(n > 0 for n in run_ranks(2, resave_in_layout, str(tmp_path / "ckpt"), str(tmp_path / "tp2"), 2, timeout=120))
    _convert("to-hf", str(tmp_path / "tp2" / "step_0000001"), str(tmp_path / "export"))
    original, exported = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "export" /
                                                                                   "model.safetensors"))
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
