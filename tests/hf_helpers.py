"""Test-side adjustments of transformers models for exact float64 comparisons."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from scaletrain.cli import main


def run_rotary_in_float64(hf_model, ours) -> None:
    """transformers computes RoPE angles in float32 even in a float64 model. Check its frequencies
    against ours at float32 precision, then run its rotary in float64 on our frequencies, so the
    rest of the architecture is compared exactly."""
    rot = hf_model.model.rotary_emb
    assert torch.allclose(rot.inv_freq.double(), ours.rope.inv_freq, rtol=1e-6, atol=0)
    rot.inv_freq = ours.rope.inv_freq.clone()

    def rotary(x, position_ids):
        freqs = position_ids[..., None].double() * rot.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rot.attention_scaling).to(x.dtype), (emb.sin() * rot.attention_scaling).to(x.dtype)

    rot.forward = rotary


def patch_hf_float64(monkeypatch, hf, ours):
    """transformers computes RMSNorm, softmax and RoPE angles in float32 even in a float64 model; run
    those few ops in float64 (on the same formulas) so the comparison resolves 1e-10."""
    import torch.nn.functional as F

    real_softmax = F.softmax
    monkeypatch.setattr(F, "softmax", lambda x, dim=None, dtype=None, **kw: real_softmax(
        x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kw))
    for m in hf.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = (lambda mod: lambda x: mod.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                           + mod.variance_epsilon)))(m)
    run_rotary_in_float64(hf, ours)


def run_mixtral_router_in_float64(hf) -> None:
    """transformers' Mixtral router takes its softmax in float32 (`router_logits.float()`) even in a float64
    model; run the same formula (softmax, top-k, renormalise) in the model's dtype."""
    for m in hf.modules():
        if type(m).__name__ == "MixtralTopKRouter":
            def forward(x, mod=m):
                logits = torch.nn.functional.linear(x.reshape(-1, mod.hidden_dim), mod.weight)
                top, index = torch.topk(logits.softmax(-1), mod.top_k, dim=-1)
                return logits, top / top.sum(-1, keepdim=True), index
            m.forward = forward


def assert_round_trip(tmp_path, hf_dir, hf, expect_key: str) -> None:
    """`convert from-hf` then `to-hf` of the HF directory `hf_dir` (whose model is `hf`): the exported weights
    are bit-identical (and hold a key containing `expect_key`), every config field comes back, and
    transformers loads the export with no missing or unexpected keys and the source's exact logits."""
    import transformers  # here: the module's other helpers serve tests that may run without it

    out = tmp_path / "export"
    assert main(["convert", "from-hf", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(out)]) == 0
    original, exported = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys() and any(expect_key in k for k in exported)
    assert all(torch.equal(exported[k], original[k]) for k in original)  # bit-identical
    src, back = transformers.AutoConfig.from_pretrained(str(hf_dir)), transformers.AutoConfig.from_pretrained(str(out))
    assert type(back) is type(src)
    src_d, back_d = src.to_dict(), back.to_dict()
    assert {k: (src_d.get(k), back_d.get(k)) for k in set(src_d) | set(back_d)
            if k != "_name_or_path" and src_d.get(k) != back_d.get(k)} == {}
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, hf.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, hf(ids).logits)
