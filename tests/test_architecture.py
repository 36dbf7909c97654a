"""The house rules of DESIGN.md that a reader can check without running anything (issue 24): no import
circles, no imports of another module's private names, function-level imports only where they keep a
heavy or optional dependency out of start-up, library files of a readable size, every test file in a tier,
and training stages known only through their registry.

The import graph comes from the source (tests/import_graph.py: AST, nothing imported).
"""

from __future__ import annotations

import ast
import re
import sys

import pytest

import import_graph as graph
from conftest import REPO

pytestmark = pytest.mark.unit

MODULES = graph.read_modules()

# Function-level imports of scaletrain's own modules, each with why it cannot be at the top.
LAZY_INTERNAL = {
    ("scaletrain.cli", "scaletrain.commands"): "`scaletrain data` runs without torch: the other commands load it",
    ("scaletrain.cli", "scaletrain.checkpoint.files"): "the same (CheckpointError's module imports torch)",
    ("scaletrain.nn.backend", "scaletrain.nn"): "te_backend needs Transformer Engine (optional, CUDA)",
    ("scaletrain.nn.fused", "scaletrain_kernels"): "Triton kernels (optional)",
    ("scaletrain.nn.fused", "scaletrain_kernels.rmsnorm"): "Triton kernels (optional)",
    ("scaletrain.nn.fused", "scaletrain_kernels.swiglu"): "Triton kernels (optional)",
    ("scaletrain.nn.fused", "scaletrain_kernels.rope"): "Triton kernels (optional)",
    ("scaletrain.nn.loss", "scaletrain_kernels.cross_entropy"): "Triton kernels (optional)",
    ("scaletrain.parallel.parallelize", "scaletrain.nn"): "te_backend needs Transformer Engine (optional, CUDA)",
}
# Third-party packages a library function may import late: heavy at start-up, optional, or CUDA-only.
LAZY_EXTERNAL = {"datasets", "pyarrow", "megatron", "datasketch", "tqdm", "sentencepiece", "tokenizers",
                 "transformer_engine", "apex", "wandb", "matplotlib", "mpi4py", "safetensors", "torch",
                 "torchao"}  # torchao: FP8 only; a build for another torch must give a clear error, not a crash
# Standard-library late imports allowed per file (none left).
LAZY_STDLIB_FILES: set[str] = set()
MAX_LINES = 400
LONG_FILES = {  # library files allowed past MAX_LINES, and why
    "scaletrain/stages/rl/sandbox/harness.py": "runs alone inside the sandbox (`python harness.py`): one "
                                               "self-contained file with no scaletrain imports by design",
    "scaletrain/config/schema.py": "one section per stage is issue 24 §3 (the next change), which splits it",
}
TIERS = ("unit", "parity", "e2e")


def test_no_import_circles():
    """Strongly connected components of the module-level import graph of scaletrain/ and tests/."""
    assert graph.circles(MODULES) == []


def test_no_circles_through_function_level_imports_either():
    """Counting the imports inside functions too (they hid issue 24's circles: checkpoint hf ↔ io,
    evaluation → posttrain/frozen → train → evaluation, and the pipeline's p2p_plan ↔ schedules), none is left."""
    assert graph.circles(MODULES, module_level_only=False) == []


def test_the_issue_24_circles_are_found_by_the_check():
    """The check can fail: the circles issue 24 measured on the old layout are found in a copy of it."""
    old = {
        "scaletrain.checkpoint.io": "from scaletrain.checkpoint.hf import copy_tokenizer\n",
        "scaletrain.checkpoint.hf": "from scaletrain.checkpoint.io import load_checkpoint\n",
        "scaletrain.evaluation.command": "from scaletrain.posttrain.frozen import model_files\n",
        "scaletrain.posttrain.frozen": "from scaletrain.train import _configure_runtime\n",
        "scaletrain.train": "from scaletrain.evaluation.command import _answer_prompts\n",
    }
    modules = {name: graph.parse_module(name, source) for name, source in old.items()}
    assert sorted(map(sorted, graph.circles(modules))) == [
        ["scaletrain.checkpoint.hf", "scaletrain.checkpoint.io"],
        ["scaletrain.evaluation.command", "scaletrain.posttrain.frozen", "scaletrain.train"]]
    assert graph.private_imports(modules) == ["scaletrain.posttrain.frozen:1: scaletrain.train._configure_runtime",
                                              "scaletrain.train:1: scaletrain.evaluation.command._answer_prompts"]


def _ours(target: str) -> bool:
    return target.split(".")[0] in ("scaletrain", "scaletrain_kernels") or target in MODULES


def test_no_private_names_imported_across_modules():
    """`from m import _x`, `import m._x` or `m._x` through an imported module, for every module of
    scaletrain/ and tests/ (function-level imports included). Third-party privates (torch._dynamo) are
    the tests' own business."""
    found = [p for p in graph.private_imports(MODULES) if _ours(p.split(": ", 1)[1].rsplit(".", 1)[0])]
    assert found == []


def test_function_level_imports_only_where_they_keep_heavy_dependencies_out():
    late = []
    for imp in graph.function_imports(MODULES):
        if not imp.module.startswith("scaletrain") or imp.type_checking:
            continue
        top = imp.target.split(".")[0]
        if top in ("scaletrain", "scaletrain_kernels"):
            if (imp.module, imp.target) not in LAZY_INTERNAL:
                late.append(f"{imp.module}:{imp.line} imports {imp.target} inside a function")
        elif top in sys.stdlib_module_names:
            if imp.module not in LAZY_STDLIB_FILES:
                late.append(f"{imp.module}:{imp.line} imports the standard library's {imp.target} inside a function")
        elif top not in LAZY_EXTERNAL:
            late.append(f"{imp.module}:{imp.line} imports {imp.target} inside a function (not a heavy/optional one)")
    assert late == []


def test_every_allowed_late_import_is_still_there():
    """The allow-list above shrinks with the code: an entry nothing needs any more is a failure."""
    present = {(i.module, i.target) for i in graph.function_imports(MODULES)}
    assert sorted(set(LAZY_INTERNAL) - present) == []


def test_library_files_stay_readable():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "scaletrain").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert sorted(set(long) - set(LONG_FILES)) == [], long


def test_the_sandbox_harness_stays_self_contained():
    tree = ast.parse((REPO / "scaletrain/stages/rl/sandbox/harness.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names), imported


def test_every_test_file_declares_its_tier():
    """pytestmark at the top of each test file: unit, parity or e2e (slow stays a per-test mark)."""
    missing = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        marks = re.findall(r"^pytestmark = (.+)$", path.read_text(), re.M)
        if not marks or not any(f"pytest.mark.{t}" in marks[0] for t in TIERS):
            missing.append(path.name)
    assert missing == []


def test_stage_names_are_not_switched_on_outside_the_registry():
    """Nothing compares posttrain.objective with a stage's name: the stages answer for themselves."""
    switch = re.compile(r"objective\s*(==|!=|\bin\b|\bnot in\b)\s*[\"'(]")
    found = [f"{p.relative_to(REPO)}:{n}" for p in (REPO / "scaletrain").rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if switch.search(line)]
    assert found == []


def test_no_getattr_hooks_on_the_trainer_contracts():
    hook = re.compile(r"getattr\((self\.)?(objective|train_batches|batches|source|stage|phase)\b")
    found = [f"{p.relative_to(REPO)}:{n}" for p in (REPO / "scaletrain").rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) if hook.search(line)]
    assert found == []


class _Section:
    """A posttrain section that holds only the sub-sections a stage declared: reading another one fails."""

    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


def _full_posttrain(name: str):
    from scaletrain.config.posttrain import (
        ChatConfig,
        DistillConfig,
        PostTrainConfig,
        PPOConfig,
        SandboxConfig,
    )

    return PostTrainConfig(objective=name, chat=ChatConfig(train_data=("rows.jsonl",)), ppo=PPOConfig(critic="c"),
                           distill=DistillConfig(teacher="t"), sandbox=SandboxConfig(backend="none"))


@pytest.mark.parametrize("name", ["pretrain", "sft", "dpo", "reward", "grpo", "ppo", "distill"])
def test_stages_read_only_the_settings_they_declare(name):
    """What a stage reads of `posttrain` it declares in `Stage.sections` (issue 24 §3): every config-level method
    of the stage runs here on a posttrain section holding only those sub-sections (plus `objective`), and every
    declared sub-section exists."""
    import dataclasses

    from scaletrain.config.schema import PostTrainConfig, RunConfig
    from scaletrain.stages.registry import get_stage

    stage = get_stage(name)
    known = {f.name for f in dataclasses.fields(PostTrainConfig)} - {"objective"}
    assert set(stage.sections) <= known, set(stage.sections) - known
    full = _full_posttrain(name)
    cfg = RunConfig(posttrain=_Section({f: getattr(full, f) for f in (*stage.sections, "objective")}))  # type: ignore[arg-type]
    stage.validate(cfg)
    stage.reads_documents(cfg)
    stage.rollout_group(cfg)
    stage.reference_policy(cfg)
    stage.companions(cfg)
    if name != "distill":  # (distill's derive reads its teacher from disk; its settings access is the same)
        stage.derive(cfg)


@pytest.mark.parametrize("name", ["pretrain", "sft", "dpo", "reward", "grpo", "ppo", "distill"])
def test_a_stage_cannot_read_another_stages_section(name):
    """`Stage.settings` hands a stage its declared sub-sections only; any other is refused by name."""
    import dataclasses

    from scaletrain.config.schema import PostTrainConfig, RunConfig
    from scaletrain.stages.registry import get_stage

    stage, full = get_stage(name), _full_posttrain(name)
    s = stage.settings(RunConfig(posttrain=full))
    others = [f.name for f in dataclasses.fields(PostTrainConfig) if f.name not in (*stage.sections, "objective")]
    assert others  # every stage has sections it does not read
    for other in others:
        with pytest.raises(AttributeError, match=f"stage '{name}' reads posttrain.{other}, which it does not declare"):
            getattr(s, other)
    for own in stage.sections:
        assert getattr(s, own) is getattr(full, own)


def test_stage_modules_reach_the_config_only_through_settings():
    """No module under scaletrain/stages/ but the contract (stage.py) reads `.posttrain` of a config: a stage's
    settings come from `Stage.settings`, so what it reads is what it declares."""
    import ast

    offenders = []
    for path in sorted((REPO / "scaletrain" / "stages").rglob("*.py")):
        if path.name == "stage.py" and path.parent.name == "stages":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "posttrain":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_every_posttrain_section_belongs_to_a_stage():
    import dataclasses

    from scaletrain.config.schema import PostTrainConfig
    from scaletrain.stages.registry import stages

    declared = {f for s in stages() for f in s.sections}
    assert {f.name for f in dataclasses.fields(PostTrainConfig)} - declared == {"objective"}


def test_the_data_commands_run_without_torch(tmp_path):
    """What the CLI's late import is for: `scaletrain data …` parses and runs its tools without loading torch."""
    import subprocess

    code = ("import sys; from scaletrain.cli import main; main(['data', 'synth', '--output', sys.argv[1], "
            "'--train', '3', '--test', '1']); assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "synth")], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "synth" / "sft_train.jsonl").is_file()
