"""Building blocks of post-training: DPO-family losses on fixed log-probs (hand-computed), sequence
log-probs from the vocab-parallel loss, packing without cross-document attention, the synthetic task."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scaletrain.cli import main
from scaletrain.config.schema import ModelConfig
from scaletrain.config.validate import resolve_model
from scaletrain.data.packing import Document, block_causal_mask, pack
from scaletrain.data.synth import check_answer, problems
from scaletrain.generation.scoring import sequence_logprobs
from scaletrain.models import build_model
from scaletrain.nn import cross_entropy_per_token, init_parameters
from scaletrain.stages.preference.losses import preference_loss

pytestmark = pytest.mark.unit

PC, PR, RC, RR = (torch.tensor(v, dtype=torch.float64) for v in ([-10.0, -4.0], [-12.0, -3.0], [-11.0, -5.0],
                                                                  [-11.5, -2.5]))


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_family_losses_equal_hand_computed_values():
    beta = 0.5
    h = [(-10 + 11) - (-12 + 11.5), (-4 + 5) - (-3 + 2.5)]  # [1.5, 1.5]
    loss, m = preference_loss("sigmoid", PC, PR, RC, RR, beta=beta)
    assert loss.tolist() == pytest.approx([-math.log(_sig(beta * x)) for x in h], abs=1e-12)
    assert m["rewards_chosen"].tolist() == pytest.approx([beta * 1, beta * 1])
    assert m["rewards_rejected"].tolist() == pytest.approx([beta * -0.5, beta * -0.5])
    assert m["rewards_accuracy"].tolist() == [1.0, 1.0]
    smooth, _ = preference_loss("sigmoid", PC, PR, RC, RR, beta=beta, label_smoothing=0.1)
    assert smooth.tolist() == pytest.approx([-0.9 * math.log(_sig(beta * x)) - 0.1 * math.log(_sig(-beta * x))
                                             for x in h], abs=1e-12)
    ipo, _ = preference_loss("ipo", PC, PR, RC, RR, beta=beta)
    assert ipo.tolist() == pytest.approx([(x - 1 / (2 * beta)) ** 2 for x in h], abs=1e-12)
    hinge, _ = preference_loss("hinge", PC, PR, RC, RR, beta=beta)
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - beta * x) for x in h], abs=1e-12)
    simpo, m = preference_loss("simpo", PC, PR, beta=2.0, simpo_gamma=0.5)
    assert simpo.tolist() == pytest.approx([-math.log(_sig(2.0 * (c - r) - 0.5)) for c, r in ([-10, -12], [-4, -3])],
                                           abs=1e-12)
    assert m["rewards_accuracy"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss("sigmoid", PC, PR)


def test_sequence_logprobs_from_the_per_token_loss():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    per_token = cross_entropy_per_token(logits, labels)
    assert sequence_logprobs(per_token, mask, False).tolist() == pytest.approx((lp * mask).sum(-1).tolist())
    assert sequence_logprobs(per_token, mask, True).tolist() == pytest.approx(((lp * mask).sum(-1) / mask.sum(-1)).tolist())


def test_packing_keeps_documents_apart():
    docs = [Document([5, 6, 7, 8], [0, 1, 1, 1]), Document([9, 10, 11], [1, 1, 1]), Document([3, 4, 2, 2, 2, 2], [0] * 6)]
    rows = pack(docs, seq_length=8, pad_id=0)
    assert len(rows) == 2  # [doc0 doc1 | pad], [doc2 | pad]
    r = rows[0]
    assert r["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert r["document_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, -1]
    assert r["loss_mask"].tolist() == [0, 1, 1, 0, 1, 1, 0, 0]  # no target across a document boundary
    m = resolve_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                                  vocab_size=16), tokenizer_vocab=None, tp=1, seq_length=8)
    model = build_model(m, tp_size=1, dtype=torch.float64)
    init_parameters(model, 3, tp_rank=0, tp_size=1)
    tokens, pos = r["tokens"][None], r["position_ids"][None]
    mask = block_causal_mask(r["document_ids"][None])
    base = model(tokens, position_ids=pos, attention_mask=mask)
    perturbed = tokens.clone()
    perturbed[0, 1] = 15  # inside document 0
    out = model(perturbed, position_ids=pos, attention_mask=mask)
    assert torch.equal(out[0, 4:7], base[0, 4:7])  # document 1 is unaffected, bit for bit
    assert not torch.allclose(out[0, 1:4], base[0, 1:4])
    alone = model(torch.tensor([[9, 10, 11]]))  # document 1 packed == document 1 on its own
    torch.testing.assert_close(base[0, 4:7], alone[0], rtol=1e-12, atol=1e-12)


def test_synthetic_task_is_deterministic_disjoint_and_checkable(tmp_path):
    train, test = problems(300, seed=1), problems(50, seed=1, split="test")
    assert problems(300, seed=1) == train
    assert not {p.question for p in train} & {p.question for p in test}
    assert len({p.question for p in train}) == 300
    assert all(check_answer(f"blah The answer is {p.answer}. more", p.answer) for p in train[:20])
    assert not check_answer("The answer is 41.", 42) and not check_answer("forty-two", 42)
    assert main(["data", "synth", "--output", str(tmp_path), "--train", "40", "--test", "10"]) == 0
    dpo = [json.loads(line) for line in (tmp_path / "dpo_test.jsonl").read_text().splitlines()]
    assert len(dpo) == 10 and all(check_answer(d["chosen"], d["answer"]) and not check_answer(d["rejected"], d["answer"])
                                  for d in dpo)
    sft = json.loads((tmp_path / "sft_train.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in sft["messages"]] == ["user", "assistant"]
    assert (tmp_path / "pretrain.jsonl").read_text().count("\n") == 40
