"""Print every `--set` key of the run configuration as Markdown tables, one per section.

    python docs/_scripts/config_keys.py            # print the tables
    python docs/_scripts/config_keys.py --write    # put them into docs/run-interface.md between its markers
    python docs/_scripts/config_keys.py --check    # exit 1 naming the keys docs/run-interface.md lacks

The "Renamed keys" table (old key → new key, between its own markers) is generated from
scaletrain/config/renamed.py, the one table of renamed keys.

The meaning column is each field's docstring in the config schema (the string literal after the field), so
the tables say what `scaletrain.config.load` says about a key. Nested sections (a dataclass field whose
default is itself a dataclass) become dotted sections.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "run-interface.md"
BEGIN, END = "<!-- config-keys:begin -->", "<!-- config-keys:end -->"
RENAMED_BEGIN, RENAMED_END = "<!-- renamed-keys:begin -->", "<!-- renamed-keys:end -->"


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields: the string literal right after each annotated assignment."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def markdown_cell(text: str) -> str:
    """Text that stays one table cell and shows as written: no emphasis, no HTML tags (code spans kept)."""
    parts = re.split(r"(`[^`]*`)", text.replace("|", "\\|"))
    return "".join(p if p.startswith("`") else re.sub(r"([*_])", r"\\\1", p).replace("<", "&lt;") for p in parts)


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return repr(value)


def sections(cls: type, prefix: str = "") -> list[tuple[str, type, list[tuple[str, str, str]]]]:
    """(section name, class, [(key, default, meaning)]) for cls and, depth first, its nested sections."""
    rows: list[tuple[str, str, str]] = []
    nested: list[tuple[str, type, list[tuple[str, str, str]]]] = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            nested += sections(type(default), f"{prefix}{f.name}.")
        else:
            rows.append((f.name, toml_literal(default), docs.get(f.name, "")))
    return ([(prefix.rstrip("."), cls, rows)] if rows else []) + nested


def all_keys() -> list[str]:
    from scaletrain.config.schema import RunConfig

    return [f"{name}.{key}" for name, _, rows in sections(RunConfig) for key, _, _ in rows]


def tables() -> str:
    from scaletrain.config.schema import RunConfig

    out: list[str] = []
    for name, cls, rows in sections(RunConfig):
        out += [f"### `[{name}]`", "", " ".join((cls.__doc__ or "").split()), "",
                "| key | default | meaning |", "|---|---|---|"]
        out += [f"| `{name}.{key}` | `{default}` | {markdown_cell(doc)} |" for key, default, doc in rows]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def renamed_table() -> str:
    from scaletrain.config.renamed import RENAMED

    rows = [f"| `{old}` | {', '.join(f'`{n}`' for n in new)} |" for old, new in RENAMED.items()]
    return "\n".join(["| old key | new key |", "|---|---|", *rows]) + "\n"


def missing_keys(doc: Path = DOC) -> list[str]:
    from scaletrain.config.renamed import RENAMED

    text = doc.read_text(encoding="utf-8")
    renamed = text.split(RENAMED_BEGIN, 1)[-1].split(RENAMED_END, 1)[0] if RENAMED_BEGIN in text else ""
    return ([k for k in all_keys() if f"`{k}`" not in text]
            + [old for old in RENAMED if f"`{old}`" not in renamed])


def _between(text: str, begin: str, end: str, body: str) -> str:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}{end}{tail}"


def write(doc: Path = DOC) -> None:
    text = _between(doc.read_text(encoding="utf-8"), BEGIN, END, tables())
    doc.write_text(_between(text, RENAMED_BEGIN, RENAMED_END, renamed_table()), encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    elif sys.argv[1:] == ["--check"]:
        missing = missing_keys()
        if missing:
            print(f"{DOC} lacks {len(missing)} key(s): {', '.join(missing)}; regenerate its tables with "
                  f"python docs/_scripts/config_keys.py", file=sys.stderr)
            raise SystemExit(1)
        print(f"all {len(all_keys())} keys are in {DOC.name}")
    else:
        sys.stdout.write(tables())
