"""A deterministic synthetic task with checkable answers: arithmetic word problems.

One problem family in three forms — pretraining text, chat (SFT) conversations, and preference pairs
(the correct answer chosen, a near-miss rejected) — with a held-out split that shares no problem
with training (split by a hash of the problem's full wording). Held-out problems reuse number
combinations seen in training under other names and objects: on a CPU-sized model the split
tests whether a stage transfers what was learnt to new wordings and to the chat format, not
whether it learns arithmetic beyond its facts. It is the CPU-sized proof
that each post-training stage does its job, and the verifiable reward for RL later: `check_answer`.
A fourth form, tool use, asks the same questions on operands too large to memorise and answers them
through the bundled calculator (assistant tool call → tool result → answer).
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
SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
TOOL_SEED_OFFSET = 7919  # tool problems are drawn from their own stream, not the plain task's


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    key: str  # template and numbers (several wordings share one)

    @property
    def expression(self) -> str:
        """The calculator expression that answers the problem, e.g. '37*8'."""
        op, a, b = self.key.split(":")
        return f"{a}{SYMBOLS[op]}{b}"

    @property
    def held_out(self) -> bool:
        return int(hashlib.sha256(self.question.encode()).hexdigest(), 16) % 10 == 0  # ~10% held out


def problems(n: int, seed: int = 0, split: str = "train", *, max_number: int = 20,
             ops: tuple[str, ...] = OPS, max_second: int = 9) -> list[Problem]:
    """`n` distinct problems of `split` ('train' or 'test'), the same for the same seed and settings.
    max_number bounds the first operand, max_second the second (from 1); ops picks the templates."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    unknown = set(ops) - set(OPS)
    if unknown or not ops:
        raise ValueError(f"ops must be among {', '.join(OPS)}, got {', '.join(ops) or 'none'}")
    if max_number < 2 or max_second < 1:
        raise ValueError(f"max_number must be at least 2 and max_second at least 1, got {max_number}, {max_second}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct {split} problems; ask for fewer")
        op = ops[rng.randrange(len(ops))]
        a, b = rng.randint(2, max_number), rng.randint(1, max_second)
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


def tool_problems(n: int, seed: int = 0, split: str = "train", *, max_number: int = 99,
                  ops: tuple[str, ...] = OPS) -> list[Problem]:
    """Problems for the tool-use form: both operands up to `max_number`, beyond what a small model can
    memorise, so answering needs the calculator (a stream of their own: seed offset)."""
    return problems(n, seed + TOOL_SEED_OFFSET, split, max_number=max_number, ops=ops, max_second=max_number)


def tool_conversation(p: Problem) -> list[dict]:
    """user question → assistant calls the calculator → tool result → assistant answers."""
    return [{"role": "user", "content": p.question},
            {"role": "assistant", "tool_calls": [{"name": "calculator", "arguments": {"expression": p.expression}}]},
            {"role": "tool", "name": "calculator", "content": str(p.answer)},
            {"role": "assistant", "content": answer_text(p.answer)}]


def tool_transcript(p: Problem) -> str:
    """The tool-use form as plain pretraining text (no chat markup): the call, its result, the answer."""
    call = json.dumps({"name": "calculator", "arguments": {"expression": p.expression}})
    return f"Question: {p.question}\nCall: {call}\nResult: {p.answer}\nAnswer: {answer_text(p.answer)}"


def choice_row(p: Problem, rng: random.Random) -> dict:
    """The problem as a 4-way multiple choice: the right answer and the near misses ±1, ±2, shuffled."""
    options = [p.answer + d for d in (0, -2, -1, 1, 2)]
    wrong = rng.sample(options[1:], 3)
    choices = [p.answer, *wrong]
    rng.shuffle(choices)
    return {"context": f"Question: {p.question}\nAnswer:", "choices": [f" {answer_text(c)}" for c in choices],
            "answer": choices.index(p.answer)}


def write_task(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, *, max_number: int = 20,
               ops: tuple[str, ...] = OPS, tool_max_number: int = 99) -> dict[str, int]:
    """Write pretrain.jsonl, sft_{train,test}.jsonl, dpo_{train,test}.jsonl, tools_{train,test}.jsonl
    (tool-use conversations on operands up to `tool_max_number`), tools_pretrain.jsonl (the training
    tool problems as plain transcripts, for a base model that has seen tool use) and choice_test.jsonl
    (the held-out problems as 4-way multiple choice); returns row counts."""
    if n_train < 1 or n_test < 0:
        raise ValueError(f"--train {n_train} --test {n_test}: ask for at least 1 training problem and 0 or more "
                         "held-out ones.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    choice_rng = random.Random(seed + 2)  # its own stream: the other files do not change
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
        tps = tool_problems(n, seed, split, max_number=tool_max_number, ops=ops)
        rows[f"tools_{split}"] = [{"messages": tool_conversation(p), "answer": p.answer} for p in tps]
        if split == "test":  # multiple choice in the pretraining text form (`scaletrain eval --task choice:…`)
            rows["choice_test"] = [choice_row(p, choice_rng) for p in ps]
        if split == "train":
            rows["tools_pretrain"] = [{"text": tool_transcript(p)} for p in tps]
            rows["pretrain"] = [{"text": f"Question: {p.question}\nAnswer: {answer_text(p.answer)}"} for p in ps]
        for name, items in rows.items():
            with open(out / f"{name}.jsonl", "w") as f:
                for item in items:
                    f.write(json.dumps(item) + "\n")
            counts[name] = len(items)
    return counts
