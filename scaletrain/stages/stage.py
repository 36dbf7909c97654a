"""The Stage contract: everything that differs between training stages, in one typed place.

A stage (pretraining, SFT, DPO, reward model, GRPO, PPO, distillation, …) is one subpackage of
scaletrain/stages/ with a `Stage` subclass, registered once (stages/registry.py). The run assembly
(scaletrain/build.py, scaletrain/prepare.py) is the same for every stage and asks the stage, at these points:

1. before anything is read (config only): `derive` (values the stage fills, e.g. a reward model's score
   head), `validate` (its cross-field rules, as messages), `reads_documents` (data.prefixes or chat rows),
   `rollout_group` (whether it samples, for validation and the memory planner), `companions` (the models
   it loads besides the policy: checked on disk up front, counted by the planner, built by the one
   model-building path);
2. before any parameter exists: `render` (its chat rows, rendered and checked, so a bad file fails cheaply);
3. once the policy exists and a resumed run is loaded: `build`, returning the objective, the batch
   source, its phases (extra work the trainer calls by name) and, if it has its own, the validator.

Settings: a stage reads `cfg.posttrain` only through `settings(cfg)`, which holds exactly the sub-sections of
`[posttrain]` it declares in `sections` (its own, e.g. `grpo`, and the shared ones it uses, e.g. `chat`,
`rollout`); reading any other is an error (scaletrain/config/posttrain.py has them all).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from scaletrain.chat.tools import BUNDLED_TOOLS
from scaletrain.config.schema import RunConfig
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.distributed.dims import ParallelDims
from scaletrain.model_builder import ModelBuilder
from scaletrain.trainer.contracts import BatchSource, Objective, Phase, Validator
from scaletrain.trainer.loop import LoopState
from scaletrain.trainer.precision import Precision


class Settings:
    """The `[posttrain]` sub-sections one stage declared (attribute = section name, value = its frozen dataclass).
    Any other section is refused by name, so a stage cannot come to depend on another stage's settings."""

    def __init__(self, stage: str, sections: dict[str, Any]) -> None:
        self._stage, self._sections = stage, sections

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("_sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"stage '{self.__dict__.get('_stage')}' reads posttrain.{name}, which it does not "
                             f"declare in Stage.sections ({', '.join(sections) or 'none'}); add it there.")


@dataclass(frozen=True)
class Companion:
    """A model a stage loads besides the policy, named by a config key: checked before anything is
    allocated (`scaletrain.model_builder.check_companion`), counted by the memory planner."""

    key: str  # the config key that names it, for messages: 'posttrain.distill.teacher'
    path: str  # an HF directory, or a checkpoint / checkpoints folder / run directory
    role: str  # 'reward' (frozen score head), 'critic' (trained score head) or 'teacher' (frozen LM)


@dataclass
class RunParts:
    """What a stage builds from: the run's resolved config and tokenizer, its layout and runtime, and
    the one model-building path bound to them. `resumed` says whether the policy came from a checkpoint
    of this run, at step `start_step` (companions trained beside it resume from the run directory too)."""

    cfg: RunConfig
    tokenizer: Tokenizer
    dims: ParallelDims
    precision: Precision
    device: torch.device
    run_dir: Path
    models: ModelBuilder
    log: Callable[[str], None]
    fused_cross_entropy: bool = False
    resumed: bool = False
    start_step: int = 0


@dataclass
class StageParts:
    """What a stage hands the trainer. validator None: the loss over posttrain.chat.valid_data / the
    validation split, when there is one and train.eval_interval asks for it."""

    objective: Objective
    batches: BatchSource
    phases: tuple[Phase, ...] = ()
    validator: Validator | None = None
    valid_dataset: Any = None  # held-out data for the default validation


class Stage(ABC):
    """One training stage. Subclasses set `name` (posttrain.objective and, with `help`, the CLI command)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""  # the `scaletrain <name>` command's help; "" = no command of its own
    sections: ClassVar[tuple[str, ...]] = ()  # the [posttrain] sub-sections the stage reads (config/posttrain.py)
    score_head: ClassVar[bool] = False  # trains a score-head model (model.num_labels = 1), not a language model
    data_rows: ClassVar[str] = ""  # what posttrain.chat.train_data rows hold ("" = the stage needs none)

    def settings(self, cfg: RunConfig) -> Any:
        """The posttrain sub-sections this stage declared in `sections`, and nothing else."""
        return Settings(self.name, {name: getattr(cfg.posttrain, name) for name in self.sections})

    # --- config only -----------------------------------------------------------------------------------
    def reads_documents(self, cfg: RunConfig) -> bool:
        """Whether the run reads data.prefixes (tokenized documents) rather than posttrain.train_data."""
        return False

    def derive(self, cfg: RunConfig) -> RunConfig:
        """Fill the values this stage derives (before the model sizes are resolved); default: none."""
        return cfg

    def validate(self, cfg: RunConfig) -> list[str]:
        """This stage's cross-field rules: one message per broken rule, each saying what to change."""
        return []

    def config_errors(self, cfg: RunConfig) -> list[str]:
        """The rules every stage shares (training rows, score head or logits), then `validate`'s."""
        return base_errors(self, cfg)

    def rollout_group(self, cfg: RunConfig) -> int:
        """Completions each step samples per prompt on the training layout (0: the stage does not sample)."""
        return 0

    def companions(self, cfg: RunConfig) -> list[Companion]:
        """The models this run loads besides the policy (reward model, critic, teacher)."""
        return []

    def reference_policy(self, cfg: RunConfig) -> bool:
        """Whether the run keeps a frozen copy of the starting policy (a KL penalty's reference)."""
        return False

    # --- build ---------------------------------------------------------------------------------------
    def render(self, parts: RunParts) -> tuple[Any, Any]:
        """(train, valid) chat datasets, rendered before any parameter exists; default: none."""
        return None, None

    @abstractmethod
    def build(self, parts: RunParts, model: torch.nn.Module, rendered: tuple[Any, Any], state: LoopState) -> StageParts:
        """Objective, batch source, phases and validator of a run whose policy `model` is built (and resumed)."""


def base_errors(stage: Stage, cfg: RunConfig) -> list[str]:
    """The rules every stage shares (training rows, score head or logits, known tools), then the stage's own
    (`Stage.validate`)."""
    errors: list[str] = []
    if stage.data_rows and not cfg.posttrain.chat.train_data:
        errors.append(f"posttrain.objective = '{stage.name}' needs posttrain.chat.train_data (jsonl files with "
                      f"{stage.data_rows}).")
    m = cfg.model
    if stage.score_head and m.num_labels not in (0, 1):
        errors.append(f"model.num_labels = {m.num_labels}: a reward model scores one number per conversation; set "
                      "model.num_labels = 1 (or leave it 0).")
    elif not stage.score_head and m.num_labels:
        errors.append(f"model.num_labels = {m.num_labels} gives the model a score head and no token logits, which "
                      f"posttrain.objective = '{stage.name}' needs; set model.num_labels = 0 (or train a reward model "
                      "with posttrain.objective = 'reward').")
    g = cfg.posttrain.grpo  # a sampling stage that does not read them would silently ignore DAPO's options
    if stage.rollout_group(cfg) and "grpo" not in stage.sections and (g.dynamic_sampling or g.mask_truncated):
        errors.append(f"posttrain.grpo.dynamic_sampling and posttrain.grpo.mask_truncated are GRPO's (DAPO): "
                      f"posttrain.objective = '{stage.name}' does not read them; turn them off or use "
                      "posttrain.objective = 'grpo'.")
    unknown_tools = [t for t in cfg.posttrain.chat.tools if t not in BUNDLED_TOOLS]
    if unknown_tools:
        errors.append(f"posttrain.chat.tools: unknown tool(s) {', '.join(unknown_tools)}; bundled: {', '.join(BUNDLED_TOOLS)}.")
    return errors + stage.validate(cfg)

