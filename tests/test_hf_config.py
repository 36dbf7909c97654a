"""Exports carry every config field a loader needs: import → export of transformers-made Llama, Qwen2 and
Mistral models (with their tokenizers) gives back the source config.json and generation_config.json on
every field transformers defines, except the differences listed here on purpose."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from scaletrain.chat.renderer import LLAMA3
from scaletrain.checkpoint.hf import import_from_hf
from scaletrain.export import export_to_hf

from chat_fixtures import build_bpe_tokenizer, build_chatml_tokenizer

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=512, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.03)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _source(kind: str, out, tokenizer_dir):
    """A transformers-made model of `kind` with a tokenizer whose ids agree with its config."""
    if kind == "llama":  # Llama 3.1 style: rope scaling, tied, head_dim ≠ hidden/heads, eos ≠ end of turn
        config = transformers.LlamaConfig(**COMMON, head_dim=12, tie_word_embeddings=True, bos_token_id=0,
                                          eos_token_id=1, rope_parameters={
                                              "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64})
        build_bpe_tokenizer(out, LLAMA3_SPECIALS, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    elif kind == "qwen2":  # Qwen2.5 style: qkv bias, an unused sliding window, eos = <|im_end|>
        config = transformers.Qwen2Config(**COMMON, sliding_window=4096, use_sliding_window=False, max_window_layers=1,
                                          bos_token_id=0, eos_token_id=2, pad_token_id=0,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        build_chatml_tokenizer(out)
    else:  # Mistral without a sliding window, on a SentencePiece tokenizer (unk 0, bos 1, eos 2)
        config = transformers.MistralConfig(**COMMON, head_dim=16, sliding_window=None, bos_token_id=1, eos_token_id=2)
        shutil.copytree(tokenizer_dir, out)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    return model.eval()


UNK = {"llama": {}, "qwen2": {"unk_token_id": ("<absent>", 0)}, "mistral": {"unk_token_id": ("<absent>", 0)}}


def _differences(a, b) -> dict[str, tuple]:
    a, b = a.to_dict(), b.to_dict()
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_import_export_gives_back_the_source_config(tmp_path, tokenizer_dir, kind):
    src = tmp_path / "source"
    model = _source(kind, src, tokenizer_dir)
    out = export_to_hf(import_from_hf(src, tmp_path / "ckpt"), tmp_path / "export")
    config = _differences(transformers.AutoConfig.from_pretrained(str(src)),
                          transformers.AutoConfig.from_pretrained(str(out)))
    # On purpose: where the directory is; the unk id the tokenizer implies (not a field of these configs;
    # SmolLM2's own config carries it) where the tokenizer has one.
    assert config == {"_name_or_path": (str(src), str(out)), **UNK[kind]}, config
    generation = _differences(transformers.GenerationConfig.from_pretrained(str(src)),
                              transformers.GenerationConfig.from_pretrained(str(out)))
    # On purpose: the export writes its generation config itself — not marked as derived from config.json,
    # which would let generate() replace the eos list by config.json's single eos.
    derived = {"_from_model_config": (True, None)}
    if kind == "llama":  # on purpose: a chat model's eos list ends turns at <|eot_id|> too
        assert generation == {**derived, "eos_token_id": (1, [1, 4])}, generation
    else:  # Qwen2: the end-of-turn marker is eos itself, one id
        assert generation == derived, generation
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_an_export_without_a_source_config_still_has_every_field(tmp_path, tokenizer_dir, kind):
    """A run trained from scratch has no HF source: the mapping and the tokenizer alone give every field a
    loader reads (ids, dtype, positions, RoPE, biases, head_dim); only inert fields are transformers' defaults."""
    src = tmp_path / "source"
    _source(kind, src, tokenizer_dir)
    ckpt = import_from_hf(src, tmp_path / "ckpt")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state.pop("hf_config", None), state.pop("hf_generation_config", None)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    out = export_to_hf(ckpt, tmp_path / "export")
    config = _differences(transformers.AutoConfig.from_pretrained(str(src)),
                          transformers.AutoConfig.from_pretrained(str(out)))
    # Qwen2: max_window_layers is meaningless without a sliding window; its tokenizer has no bos (as Qwen's).
    inert = {"qwen2": {"max_window_layers": (1, 28), "bos_token_id": (0, None)}}.get(kind, {})
    assert config == {"_name_or_path": (str(src), str(out)), **UNK[kind], **inert}, config
    expected = {"llama": {"bos_token_id": 0, "eos_token_id": [1, 4]}, "qwen2": {"eos_token_id": 2, "pad_token_id": 0},
                "mistral": {"bos_token_id": 1, "eos_token_id": 2}}[kind]
    assert json.loads((out / "generation_config.json").read_text()) == {**expected, "do_sample": False}
