"""Verifiable rewards for RL: functions of (completion text, data row) → float.

Bundled:
- `math_answer`: 1.0 when the completion's answer equals the row's `answer`, compared as exact
  numbers ('12', '12.0', '1,200', '24/2' are what they say); the answer is the last `\\boxed{…}`, else
  the first 'The answer is …', else the last '#### …' (GSM8K's marker). 0.0 otherwise.
- `python_tests`: 1.0 when the completion's code (its last ```python block, else the whole text) passes
  the row's `tests` (Python source, typically asserts) in a separate interpreter: isolated mode (`-I`),
  an empty temporary directory, CPU-time, memory and file-size limits, a wall-clock timeout. The code
  never runs inside the training process. 0.0 on any failure.
- `answer_format`: 1.0 when the completion states a numeric answer at all (a format reward, no field read).
Custom: `package.module:function` with the same signature `(completion: str, row: dict) -> float`.
Learned: `reward_model` — a trained reward model's score (posttrain.reward_model; posttrain/reward_scorer.py),
built by the trainer in the policy's layout rather than resolved here.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

RewardFn = Callable[[str, dict], float]

_NUMBER = r"-?\$?\s*[\d,]*\.?\d+(?:\s*/\s*\d+)?"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_SAYS = re.compile(r"[Tt]he (?:final )?answer is:?\s*(" + _NUMBER + ")")
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_CODE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def _number(text: str) -> Fraction | None:
    text = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return Fraction(Fraction(num), Fraction(den))
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str | None:
    """The completion's stated answer (see the module docstring for the order), or None."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    says = _SAYS.search(text)
    if says:
        return says.group(1)
    hashes = _HASHES.findall(text)
    return hashes[-1] if hashes else None


def math_answer(completion: str, row: dict) -> float:
    if row.get("answer") is None:
        raise KeyError("math_answer needs an `answer` field in every data row")
    stated = extract_answer(completion)
    if stated is None:
        return 0.0
    got, want = _number(stated), _number(str(row["answer"]))
    if got is None or want is None:  # not numbers: compare the text exactly
        return float(stated.strip() == str(row["answer"]).strip())
    return float(got == want)


def answer_format(completion: str, row: dict) -> float:
    """1.0 when the completion states a numeric answer in one of math_answer's forms, right or wrong —
    a format reward (as in DeepSeek-R1's), which keeps a learned reward from being gamed with text
    that states nothing; it reads no data field."""
    stated = extract_answer(completion)
    return float(stated is not None and _number(stated) is not None)


def extract_code(text: str) -> str:
    """The last fenced code block of a completion, or the whole text when it has none."""
    blocks = _CODE.findall(text)
    return blocks[-1] if blocks else text


def _limit_resources(cpu_s: int, memory_bytes: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    return apply


def run_python_tests(code: str, tests: str, *, timeout_s: float = 5.0, memory_bytes: int = 1 << 30) -> bool:
    """True when `code` followed by `tests` exits 0 in a fresh, isolated, resource-limited interpreter."""
    with tempfile.TemporaryDirectory(prefix="scaletrain-reward-") as tmp:
        program = Path(tmp) / "candidate.py"
        program.write_text(code + "\n\n" + tests + "\n")
        try:
            proc = subprocess.run([sys.executable, "-I", str(program)], cwd=tmp, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout_s,
                                  env={"PATH": "/usr/bin:/bin"},
                                  preexec_fn=_limit_resources(max(1, int(timeout_s)), memory_bytes))
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0


def python_tests(completion: str, row: dict) -> float:
    if not row.get("tests"):
        raise KeyError("python_tests needs a `tests` field (Python source) in every data row")
    return float(run_python_tests(extract_code(completion), str(row["tests"])))


BUNDLED_REWARDS: dict[str, RewardFn] = {"math_answer": math_answer, "python_tests": python_tests,
                                         "answer_format": answer_format}


def resolve_reward(name: str) -> RewardFn:
    """A bundled reward by name, or `package.module:function`."""
    if name in BUNDLED_REWARDS:
        return BUNDLED_REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: bundled ones are {', '.join(BUNDLED_REWARDS)} (and "
                         f"{MODEL_REWARD!r} with posttrain.reward_model), or give 'package.module:function'")
    module, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {name!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


MODEL_REWARD = "reward_model"  # the learned reward: posttrain.reward_model's score


def reward_problem(name: str) -> str | None:
    """Why `name` is not a usable reward, or None (config validation)."""
    if name == MODEL_REWARD:
        return None
    try:
        resolve_reward(name)
    except ValueError as e:
        return str(e)
    return None


_FIELDS = {"math_answer": ("answer",), "python_tests": ("tests",)}


def required_fields(name: str) -> tuple[str, ...]:
    """The data-row fields a bundled reward reads (custom rewards: none checked up front)."""
    return _FIELDS.get(name, ())


def reward_label(name: str) -> str:
    """The metric-name part for a reward ('math_answer'; 'my.mod:fn' → 'fn')."""
    return name.rsplit(":", 1)[-1]
