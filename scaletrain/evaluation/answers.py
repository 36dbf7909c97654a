"""Stated answers: what a completion says its (numeric) answer is, and whether it is a row's `answer` —
the `math_answer` and `answer_format` rewards of RL (stages/rl/rewards.py) and the accuracy of `answer`
evaluation tasks (evaluation/runner.py)."""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = r"-?\$?\s*[\d,]*\.?\d+(?:\s*/\s*\d+)?"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_SAYS = re.compile(r"[Tt]he (?:final )?answer is:?\s*(" + _NUMBER + ")")
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")


def as_number(text: str) -> Fraction | None:
    """'12', '12.0', '1,200', '$5', '24/2' as exact numbers; None for anything else."""
    text = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return Fraction(Fraction(num), Fraction(den))
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str | None:
    """The completion's stated answer — the last `\\boxed{…}`, else the first 'The answer is …', else the last
    '#### …' (GSM8K's marker) — or None."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    says = _SAYS.search(text)
    if says:
        return says.group(1)
    hashes = _HASHES.findall(text)
    return hashes[-1] if hashes else None


def math_answer(completion: str, row: dict) -> float:
    """1.0 when the completion's stated answer equals the row's `answer` as an exact number (as text where
    either is no number), else 0.0."""
    if row.get("answer") is None:
        raise KeyError("math_answer needs an `answer` field in every data row")
    stated = extract_answer(completion)
    if stated is None:
        return 0.0
    got, want = as_number(stated), as_number(str(row["answer"]))
    if got is None or want is None:  # not numbers: compare the text exactly
        return float(stated.strip() == str(row["answer"]).strip())
    return float(got == want)


def answer_format(completion: str, row: dict) -> float:
    """1.0 when the completion states a numeric answer in one of math_answer's forms, right or wrong —
    a format reward (as in DeepSeek-R1's), which keeps a learned reward from being gamed with text
    that states nothing; it reads no data field."""
    stated = extract_answer(completion)
    return float(stated is not None and as_number(stated) is not None)
