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


def assert_same_logits_and_greedy(ours, hf, vocab: int, shape: tuple[int, int], new_tokens: int) -> None:
    """Float64 logits of `ours` equal transformers' `hf` to 1e-10 on random ids of `shape`, and greedy decoding
    (ours on the KV cache, transformers' generate on its own) gives the same `new_tokens` tokens."""
    from scaletrain.generation.turn import greedy_generate

    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-10
    gen_ours = greedy_generate(ours, ids[:1, :5], new_tokens)
    gen_hf = hf.generate(ids[:1, :5], max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                         pad_token_id=0)
    assert torch.equal(gen_ours, gen_hf)


def hf_first_batch_loss(hf, dataset_prefix: str) -> float:
    """transformers' loss on the first training batch that tiny_overrides' run (seq 32, 4 rows, seed 1234, vocab
    512) reads: a run initialised from `hf` logs exactly this loss at its first step."""
    from scaletrain.config.schema import DataConfig
    from scaletrain.data.gpt import build_gpt_datasets

    train, _ = build_gpt_datasets(DataConfig(prefixes=(dataset_prefix,)), seq_length=32, seed=1234, eod_id=2,
                                  vocab_size=512, train_samples=8, valid_samples=0)
    batch = torch.stack([torch.as_tensor(train[i]["tokens"]) for i in range(4)])
    labels = torch.stack([torch.as_tensor(train[i]["labels"]) for i in range(4)])
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(hf(batch).logits.flatten(0, 1), labels.flatten()).item()


def resave_in_layout(rank: int, world: int, ckpt: str, out_root: str, tp: int, pp: int = 1) -> int:
    """A run_ranks body: load a checkpoint at tp·pp (sharded as it would train) and save it again from that
    layout; returns this rank's parameter count."""
    import dataclasses

    from scaletrain.checkpoint import load_checkpoint, save_checkpoint
    from scaletrain.checkpoint.hf import checkpoint_model_config
    from scaletrain.config.schema import ParallelConfig
    from scaletrain.distributed import ParallelDims
    from scaletrain.models import build_model
    from scaletrain.parallel.parallelize import parallelize

    cfg = checkpoint_model_config(ckpt)
    pcfg = ParallelConfig(tp=tp, pp=pp)
    dims = ParallelDims.from_config(pcfg, world, rank)
    with torch.device("meta"):
        model = build_model(cfg, tp_size=tp)
    parallelize(model, dims, pcfg)
    load_checkpoint(ckpt, model, None, dims=dims)
    save_checkpoint(out_root, 1, model, None, {"consumed_samples": 0, "model_config": dataclasses.asdict(cfg)},
                    dims=dims, tokenizer=None)
    return len(list(model.parameters()))
