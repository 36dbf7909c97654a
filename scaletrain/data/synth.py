"""A deterministic synthetic task with checkable answers: arithmetic word problems.

One problem family in three forms — pretraining text, chat (SFT) conversations, and preference pairs
(the correct answer chosen, a near-miss rejected) — with a held-out split that shares no problem
with training (split by a hash of the problem's full wording). Held-out problems reuse number
combinations seen in training under other names and objects: on a CPU-sized model the split
tests whether a stage transfers what was learnt to new wordings and to the chat format, not
whether it learns arithmetic beyond its facts. It is the CPU-sized proof
that each post-training stage does its job, and the verifiable reward for RL later: `check_answer`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jun")
ITEMS = ("apples", "books", "coins", "shells", "stamps", "marbles", "pencils", "cards")
TEMPLATES = {
    "add": ("{n} has {a} {i} and gets {b} more. How many {i} does {n} have now?", lambda a, b: a + b),
    "sub": ("{n} has {a} {i} and gives away {b}. How many {i} are left?", lambda a, b: a - b),
    "mul": ("{n} buys {a} bags with {b} {i} in each bag. How many {i} is that?", lambda a, b: a * b),
}
OPS = tuple(TEMPLATES)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    key: str  # template and numbers (several wordings share one)

    @property
    def held_out(self) -> bool:
        return int(hashlib.sha256(self.question.encode()).hexdigest(), 16) % 10 == 0  # ~10% held out


def problems(n: int, seed: int = 0, split: str = "train", *, max_number: int = 20,
             ops: tuple[str, ...] = OPS) -> list[Problem]:
    """`n` distinct problems of `split` ('train' or 'test'), the same for the same seed and settings.
    max_number bounds the first operand (the second is 1–9); ops picks the templates."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    unknown = set(ops) - set(OPS)
    if unknown or not ops:
        raise ValueError(f"ops must be among {', '.join(OPS)}, got {', '.join(ops) or 'none'}")
    if max_number < 2:
        raise ValueError(f"max_number must be at least 2, got {max_number}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct {split} problems; ask for fewer")
        op = ops[rng.randrange(len(ops))]
        a, b = rng.randint(2, max_number), rng.randint(1, 9)
        if op == "sub" and b >= a:
            continue
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        template, fn = TEMPLATES[op]
        p = Problem(template.format(n=name, a=a, b=b, i=item), fn(a, b), f"{op}:{a}:{b}")
        if p.held_out != (split == "test") or p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def answer_text(answer: int) -> str:
    return f"The answer is {answer}."


def check_answer(text: str, answer: int) -> bool:
    """Exact match of the first 'The answer is N' in a generated text (the verifiable reward)."""
    m = re.search(r"The answer is (-?\d+)", text)
    return m is not None and int(m.group(1)) == answer


def near_miss(answer: int, rng: random.Random) -> int:
    return answer + rng.choice([-2, -1, 1, 2])


def write_task(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, *, max_number: int = 20,
               ops: tuple[str, ...] = OPS) -> dict[str, int]:
    """Write pretrain.jsonl, sft_{train,test}.jsonl and dpo_{train,test}.jsonl; returns row counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    counts = {}
    for split, n in (("train", n_train), ("test", n_test)):
        ps = problems(n, seed, split, max_number=max_number, ops=ops)
        rows = {
            f"sft_{split}": [{"messages": [{"role": "user", "content": p.question},
                                           {"role": "assistant", "content": answer_text(p.answer)}],
                              "answer": p.answer} for p in ps],
            f"dpo_{split}": [{"prompt": p.question, "chosen": answer_text(p.answer),
                              "rejected": answer_text(near_miss(p.answer, rng)), "answer": p.answer} for p in ps],
        }
        if split == "train":
            rows["pretrain"] = [{"text": f"Question: {p.question}\nAnswer: {answer_text(p.answer)}"} for p in ps]
        for name, items in rows.items():
            with open(out / f"{name}.jsonl", "w") as f:
                for item in items:
                    f.write(json.dumps(item) + "\n")
            counts[name] = len(items)
    return counts
