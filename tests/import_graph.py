"""The import graph of scaletrain/ and tests/, read from the source (AST, nothing is imported).

Used by tests/test_architecture.py to enforce the house rules of DESIGN.md ("no import circles and no
imports of another module's private names") and by the issue-24 note to measure them:

- `circles`: strongly connected components of the graph of *module-level* imports (function-level
  imports run later and do not take part in start-up order; `if TYPE_CHECKING:` blocks never run).
  Importing `a.b.c` also runs the packages `a` and `a.b`, so those are edges too.
- `private_imports`: a name starting with one underscore taken from another module, at any level
  (`from m import _x`, `import m._x`, or `m._x` through an imported module).
- `function_imports`: imports inside a function or method body.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Import:
    module: str  # the importing module
    target: str  # the module imported from (absolute)
    names: tuple[str, ...]  # names taken from it ('' for `import target`)
    line: int
    in_function: bool
    type_checking: bool


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: list[Import] = field(default_factory=list)
    private_attributes: list[tuple[str, str, int]] = field(default_factory=list)  # (module alias target, name, line)


def module_name(path: Path, root: Path, top: str | None) -> tuple[str, bool]:
    """Dotted module name of a file: scaletrain/x/y.py → scaletrain.x.y; tests/foo.py → foo (the tests
    directory is on sys.path when pytest runs)."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    if top is not None:
        parts = [top, *parts]
    return ".".join(parts), is_package


def _absolute(module: Module, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([target] if target else [])])


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: Module) -> None:
        self.module = module
        self.depth = 0  # function nesting
        self.type_checking = 0
        self.aliases: dict[str, str] = {}  # local name → module it is bound to (module-level `import x as y`)

    def _enter(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _enter

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        if guarded:
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _add(self, target: str, names: tuple[str, ...], line: int) -> None:
        self.module.imports.append(Import(self.module.name, target, names, line, self.depth > 0,
                                          self.type_checking > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, ("",), node.lineno)
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                self.aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        target = _absolute(self.module, node.level, node.module)
        self._add(target, tuple(a.name for a in node.names), node.lineno)
        for alias in node.names:  # `from pkg import mod as m`: m may be a module
            self.aliases[alias.asname or alias.name] = f"{target}.{alias.name}"

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases and _private(node.attr):
            self.module.private_attributes.append((self.aliases[node.value.id], node.attr, node.lineno))
        self.generic_visit(node)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def parse_module(name: str, source: str, *, is_package: bool = False) -> Module:
    """The imports of one module's source (a module that need not exist on disk)."""
    module = Module(name, Path(name), is_package)
    _Visitor(module).visit(ast.parse(source))
    return module


def read_modules(roots: tuple[tuple[str, str | None], ...] = (("scaletrain", "scaletrain"), ("tests", None))
                 ) -> dict[str, Module]:
    """Every .py file under the roots, parsed: {module name: Module}."""
    out: dict[str, Module] = {}
    for folder, top in roots:
        root = REPO / folder
        for path in sorted(root.rglob("*.py")):
            name, is_package = module_name(path, root, top)
            module = Module(name, path, is_package)
            _Visitor(module).visit(ast.parse(path.read_text(), str(path)))
            out[name] = module
    return out


def _resolve(modules: dict[str, Module], imp: Import) -> Iterator[str]:
    """The known modules an import runs: the target, its parent packages, and `from pkg import sub` submodules."""
    parts = imp.target.split(".")
    # A module's own packages are initialised before it runs: importing them again is no edge.
    own = {".".join(imp.module.split(".")[:i]) for i in range(1, imp.module.count(".") + 2)}
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name in modules and name not in own:
            yield name
    for n in imp.names:
        sub = f"{imp.target}.{n}" if n else ""
        if sub in modules and sub not in own:
            yield sub


def graph(modules: dict[str, Module], *, module_level_only: bool = True) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for m in modules.values():
        for imp in m.imports:
            if imp.type_checking or (module_level_only and imp.in_function):
                continue
            edges[m.name].update(_resolve(modules, imp))
    return edges


def circles(modules: dict[str, Module], *, module_level_only: bool = True) -> list[list[str]]:
    """Import cycles: strongly connected components with more than one module (Tarjan)."""
    edges = graph(modules, module_level_only=module_level_only)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        work = [(v, iter(sorted(edges[v])))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return out


def private_imports(modules: dict[str, Module]) -> list[str]:
    """'importer:line: target.name' for every private name taken from another module."""
    out = []
    for m in modules.values():
        for imp in m.imports:
            if imp.target == m.name:
                continue
            for n in imp.names:
                if n and _private(n):
                    out.append(f"{m.name}:{imp.line}: {imp.target}.{n}")
            if any(_private(part) for part in imp.target.split(".")):
                out.append(f"{m.name}:{imp.line}: {imp.target}")
        for target, name, line in m.private_attributes:
            if target != m.name and target.split(".")[0] in ("scaletrain", *modules):
                if target in modules or target.startswith("scaletrain"):
                    out.append(f"{m.name}:{line}: {target}.{name}")
    return sorted(set(out))


def function_imports(modules: dict[str, Module]) -> list[Import]:
    return [imp for m in modules.values() for imp in m.imports if imp.in_function]
