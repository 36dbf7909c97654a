"""An independent reference for the DPO family: TRL's DPOTrainer (with transformers' Llama) on the same
weights and the same token rows gives the same loss as our objective (with our model).

The policy and reference are two differently initialised Hugging Face Llamas saved locally; both sides
load them (ours through the HF import), so the comparison covers the model forward, the response
log-probs and the loss formula. TRL's defaults (bf16, gradient checkpointing) are off for an exact match.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from scaletrain.chat.renderer import ChatRenderer
from scaletrain.checkpoint.hf import read_hf_dir
from scaletrain.data.loader import collate
from scaletrain.data.tokenizer import load_tokenizer
from scaletrain.models import build_model
from scaletrain.stages.preference.data import PreferenceDataset, read_pairs
from scaletrain.stages.preference.dpo import DPOObjective
from scaletrain.stages.preference.reference import RecordLogProbs

pytestmark = pytest.mark.parity

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")


def _hf_llama(path, tokenizer_dir, vocab: int, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the 0.02 init, so policy and reference differ clearly
        for p in model.parameters():
            p.mul_(5.0) if p.dim() > 1 else None
    model.save_pretrained(str(path), safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, path / f.name)


def _ours(path) -> torch.nn.Module:
    cfg, state = read_hf_dir(path)
    model = build_model(cfg, dtype=torch.float32)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_equal_trl_on_the_same_rows(tmp_path, tokenizer_dir, loss_type):
    from datasets import Dataset

    from scaletrain.cli import main

    tok = load_tokenizer(str(tokenizer_dir))
    policy_dir, ref_dir = tmp_path / "policy", tmp_path / "ref"
    _hf_llama(policy_dir, tokenizer_dir, tok.vocab_size, seed=0)
    _hf_llama(ref_dir, tokenizer_dir, tok.vocab_size, seed=1)
    assert main(["data", "synth", "--output", str(tmp_path / "d"), "--train", "6", "--test", "2"]) == 0
    rows = read_pairs([str(tmp_path / "d" / "dpo_train.jsonl")])
    pairs = PreferenceDataset(rows, ChatRenderer(tok, "chatml"), tok, 96)
    batch = collate([pairs[i] for i in range(len(pairs))])
    beta = 0.1

    # Ours: the reference phase's recorder takes the reference log-probs with DPO's own arithmetic.
    objective = DPOObjective(None, loss_type, beta)
    model_in = objective.prepare(batch)
    recorder = RecordLogProbs(objective)
    with torch.no_grad():
        logits, loss_fn = recorder.forward_step(model_in, _ours(ref_dir))
        loss_fn(logits)
    objective.reference.update(recorder.table)
    with torch.no_grad():
        logits, loss_fn = objective.forward_step(model_in, _ours(policy_dir))
        loss_sum, metrics = loss_fn(logits)
    ours = float(loss_sum) / len(pairs)

    # TRL on the same rows: whole sequences (first token + labels) and a completion mask on the response
    # tokens (our mask marks the position *before* each response token).
    labels = model_in["labels"].clone()
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    labels[labels < 0] = pad
    input_ids = torch.cat([model_in["tokens"][:, :1], labels], dim=1)
    completion = torch.cat([torch.zeros_like(model_in["response_mask"][:, :1]), model_in["response_mask"]], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": completion.long()}
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(policy_dir))
    if hf_tok.pad_token is None:
        hf_tok.pad_token = hf_tok.eos_token
    policy = transformers.AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], bf16=False, fp16=False,
                         gradient_checkpointing=False, report_to="none", use_cpu=True,
                         per_device_train_batch_size=len(pairs))
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=hf_tok,
                             train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                              for r in rows]))
    trainer.model.eval()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, inputs))
    assert abs(ours - 0.6931) > 1e-3 if loss_type == "sigmoid" else True  # policy ≠ reference: a real margin
    assert ours == pytest.approx(theirs, rel=2e-5, abs=1e-6), (loss_type, ours, theirs)
