"""The stage registry: posttrain.objective names → Stage objects.

The built-in stages register here, at the bottom, one line each. A new stage is one subpackage with a
`Stage` subclass and one `register(...)` call — here for a built-in, or from the code that defines it
(a plugin, a test): nothing else changes. The trainer, the run assembly and the CLI know stages only
through this registry: `scaletrain <name>` commands and the choices of posttrain.objective come from it.
"""

from __future__ import annotations

from scaletrain.config.load import ConfigError
from scaletrain.stages.distill.stage import DistillStage
from scaletrain.stages.preference.stage import DPOStage, RewardModelStage
from scaletrain.stages.pretrain.stage import PretrainStage
from scaletrain.stages.rl.stage import GRPOStage, PPOStage
from scaletrain.stages.sft.stage import SFTStage
from scaletrain.stages.stage import Stage

_STAGES: dict[str, Stage] = {}


def register(stage: Stage, *, replace: bool = False) -> Stage:
    """Add `stage` under `stage.name` (its posttrain.objective value and, with a help text, its command)."""
    if not stage.name:
        raise ValueError(f"{type(stage).__name__} has no name")
    if stage.name in _STAGES and not replace:
        raise ValueError(f"a stage named {stage.name!r} is registered already ({type(_STAGES[stage.name]).__name__})")
    _STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    _STAGES.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_STAGES)


def stages() -> tuple[Stage, ...]:
    return tuple(_STAGES.values())


def get_stage(name: str) -> Stage:
    """The stage of posttrain.objective = `name`; a ConfigError naming the registered ones otherwise."""
    if name not in _STAGES:
        raise ConfigError(f"Invalid config:\n  - posttrain.objective = {name!r} is not one of {', '.join(_STAGES)}.")
    return _STAGES[name]


for _builtin in (PretrainStage(), SFTStage(), DPOStage(), GRPOStage(), PPOStage(), RewardModelStage(), DistillStage()):
    register(_builtin)
