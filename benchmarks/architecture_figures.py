"""The structural figures of issue 24 for a checkout: the largest library files, string switches on the
stage name, import circles, private-name imports, function-level imports, getattr hooks on the trainer's
contracts and `dims is None` branches. Read from the source (tests/import_graph.py), nothing imported.

    python benchmarks/architecture_figures.py [REPO]     # default: this checkout
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

SWITCH = re.compile(r"objective\s*(==|!=|\bin\b|\bnot in\b)\s*[\"'(]")
HOOK = re.compile(r"getattr\((self\.)?(objective|train_batches|batches|source|stage|phase)\b")
DIMS_NONE = re.compile(r"\bdims is (not )?None|\bdims: ParallelDims \| None|\bdims=None\b|\bd is (not )?None")


def figures(repo: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import import_graph as graph

    graph.REPO = repo
    modules = graph.read_modules()
    lib = {k: v for k, v in modules.items() if k.startswith("scaletrain")}
    files = {str(p.relative_to(repo)): p.read_text() for p in (repo / "scaletrain").rglob("*.py")}
    sizes = sorted(((len(t.splitlines()), f) for f, t in files.items()), reverse=True)
    private = graph.private_imports(modules)
    ours = [p for p in private if p.split(": ", 1)[1].split(".")[0] in ("scaletrain", "scaletrain_kernels")
            or p.split(": ", 1)[1].split(".")[0] in modules]
    late = [i for i in graph.function_imports(lib) if i.target.startswith("scaletrain")]
    count = lambda rx: sum(len(rx.findall(t)) for t in files.values())  # noqa: E731
    return {
        "library files / lines": (len(files), sum(n for n, _ in sizes)),
        "largest files": sizes[:5],
        "files over 400 lines": [f for n, f in sizes if n > 400],
        "switches on the stage name": sum(1 for t in files.values() for line in t.splitlines() if SWITCH.search(line)),
        "import circles (module level)": graph.circles(modules),
        "import circles (function level too)": graph.circles(modules, module_level_only=False),
        "private-name imports (library)": len([p for p in ours if p.startswith("scaletrain")]),
        "private-name imports (tests)": len([p for p in ours if not p.startswith("scaletrain")]),
        "function-level imports of scaletrain modules (library)": len(late),
        "getattr hooks on trainer contracts": count(HOOK),
        "dims-is-None branches": count(DIMS_NONE),
        "files in posttrain/ (flat)": len(list((repo / "scaletrain" / "posttrain").glob("*.py"))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    for k, v in figures(Path(p.parse_args().repo).resolve()).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
