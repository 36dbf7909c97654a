"""Verifiable rewards for RL: functions of (completion text, data row) → float.

Bundled:
- `math_answer`: 1.0 when the completion's answer equals the row's `answer`, compared as exact
  numbers ('12', '12.0', '1,200', '24/2' are what they say); the answer is the last `\\boxed{…}`, else
  the first 'The answer is …', else the last '#### …' (GSM8K's marker). 0.0 otherwise.
- `python_tests`: 1.0 when the completion's code (its last ```python block, else the whole text) passes
  the row's `tests` (Python source: asserts, HumanEval's `def check(candidate): ...; check(fn)`), judged
  in two bubblewrap sandboxes (stages/rl/sandbox/runner.py: the code in one, the tests in the other, data
  between them, the verdict from the tests' side only). 0.0 on any failure; a program that could not be
  judged (the sandbox did not start, ...) scores 0.0 and is counted as an error, never 1.0.
- `answer_format`: 1.0 when the completion states a numeric answer at all (a format reward, no field read).
Custom: `package.module:function` with the same signature `(completion: str, row: dict) -> float`.
`score_rewards` scores a batch with any of them: a reward that raises scores 0.0 with its error (counted
by the trainer as `reward_errors`), so a failing scorer costs rewards, never the training rank.
Learned: `reward_model` — a trained reward model's score (posttrain.rewards.model; stages/rl/reward_model_scorer.py),
built by the trainer in the policy's layout rather than resolved here.
"""

from __future__ import annotations

import importlib
import re
import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from scaletrain.evaluation.answers import answer_format, math_answer
from scaletrain.stages.rl.sandbox.runner import SANDBOX_MODES, SandboxSettings, run_programs, sandbox_problem

if TYPE_CHECKING:
    from scaletrain.config.posttrain import SandboxConfig

RewardFn = Callable[[str, dict], float]

_CODE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last fenced code block of a completion, or the whole text when it has none."""
    blocks = _CODE.findall(text)
    return blocks[-1] if blocks else text


class BatchedReward(ABC):
    """A reward that scores a whole batch at once (python_tests: several sandboxes at a time)."""

    @abstractmethod
    def score_batch(self, completions: list[str], rows: list[dict]) -> tuple[list[float], list[str]]:
        """Per completion: its reward, and why it could not be judged ('' if it could; the reward is then 0)."""

    def __call__(self, completion: str, row: dict) -> float:
        return self.score_batch([completion], [row])[0][0]


DEFAULT_SANDBOX = SandboxSettings()


class PythonTests(BatchedReward):
    def __init__(self, settings: SandboxSettings = DEFAULT_SANDBOX) -> None:
        self.settings = settings

    def score_batch(self, completions: list[str], rows: list[dict]) -> tuple[list[float], list[str]]:
        if not all(row.get("tests") for row in rows):
            raise KeyError("python_tests needs a `tests` field (Python source) in every data row")
        verdicts = run_programs([(extract_code(c), str(row["tests"])) for c, row in zip(completions, rows)],
                                self.settings)
        return [float(v.passed) for v in verdicts], [v.error for v in verdicts]


def run_python_tests(code: str, tests: str, settings: SandboxSettings = DEFAULT_SANDBOX) -> bool:
    """True when `tests` ran to their end against `code`, judged in the sandbox (stages/rl/sandbox/runner.py)."""
    return run_programs([(code, tests)], settings)[0].passed


python_tests = PythonTests()


def score_rewards(fn: RewardFn, completions: list[str], rows: list[dict]) -> tuple[list[float], list[str]]:
    """`fn`'s reward for every completion, and per completion why it could not be computed ('' if it could).
    A reward that raises scores 0.0 for the completions it could not judge: never the caller's exception."""
    if isinstance(fn, BatchedReward):
        try:
            return fn.score_batch(completions, rows)
        except Exception as e:
            return [0.0] * len(completions), [f"{type(e).__name__}: {e}"] * len(completions)
    values, errors = [], []
    for completion, row in zip(completions, rows):
        try:
            values.append(float(fn(completion, row)))
            errors.append("")
        except Exception as e:
            values.append(0.0)
            errors.append(f"{type(e).__name__}: {e}")
    return values, errors


def report_errors(label: str, errors: list[str]) -> None:
    """One warning line (stderr) with the count and the commonest causes of a batch's reward errors."""
    failed = [e for e in errors if e]
    if failed:
        causes = "; ".join(f"{n}× {cause[:300]}" for cause, n in Counter(failed).most_common(3))
        print(f"warning: reward {label}: {len(failed)} of {len(errors)} completions could not be scored "
              f"(reward 0, counted in reward_errors): {causes}", file=sys.stderr, flush=True)


def sandbox_settings(sb: SandboxConfig) -> SandboxSettings:
    return SandboxSettings(mode=sb.backend, timeout_s=sb.timeout_s, memory_mb=sb.memory_mb, processes=sb.processes,
                           disk_mb=sb.disk_mb, workers=sb.workers, python=sb.python)


def sandbox_problems(sb: SandboxConfig, check_live: bool) -> list[str]:
    """The posttrain.sandbox settings' problems; with `check_live` (python_tests is used), also whether the
    sandbox works here — one tiny program through it (config validation)."""
    problems = []
    if sb.backend not in SANDBOX_MODES:
        problems.append(f"posttrain.sandbox.backend = {sb.backend!r} is not one of {', '.join(SANDBOX_MODES)}.")
    for key in ("timeout_s", "memory_mb", "disk_mb"):
        if not getattr(sb, key) > 0:
            problems.append(f"posttrain.sandbox.{key} = {getattr(sb, key)} must be positive.")
    if sb.workers < 0:
        problems.append(f"posttrain.sandbox.workers = {sb.workers} must be 0 (one per CPU) or positive.")
    if sb.processes < 4:
        problems.append(f"posttrain.sandbox.processes = {sb.processes}: a sandbox itself needs 3 (bwrap's "
                        "init, the interpreter, one spare); give at least 4.")
    if check_live and not problems:
        problem = sandbox_problem(sandbox_settings(sb))
        if problem:
            problems.append(f"posttrain.rewards.functions uses python_tests, but {problem.rstrip('.')}.")
    return problems


BUNDLED_REWARDS: dict[str, RewardFn] = {"math_answer": math_answer, "python_tests": python_tests,
                                         "answer_format": answer_format}


def resolve_reward(name: str, sandbox: SandboxSettings | None = None) -> RewardFn:
    """A bundled reward by name (python_tests judged with `sandbox`, default settings without), or
    `package.module:function`."""
    if name == "python_tests" and sandbox is not None:
        return PythonTests(sandbox)
    if name in BUNDLED_REWARDS:
        return BUNDLED_REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: bundled ones are {', '.join(BUNDLED_REWARDS)} (and "
                         f"{MODEL_REWARD!r} with posttrain.rewards.model), or give 'package.module:function'")
    module, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {name!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


MODEL_REWARD = "reward_model"  # the learned reward: posttrain.rewards.model's score


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
