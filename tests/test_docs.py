"""The docs hold together: README.md and docs/ link only to files and anchors that exist, every `--set` key
of the config schema is on the run-interface page, and README still shows the commands CI runs.

Links are checked as the repository renders them (GitHub's heading anchors); `mkdocs build --strict` in CI
checks the site the same way (mkdocs.yml uses GitHub's slugs).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"(`+).*?\1")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((n, line))
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces → hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_slug(m.group(2)) for _, line in prose_lines(path) if (m := re.match(r"(#{1,6})\s+(.*)", line))}


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line per link whose file or heading does not exist (root: what paths are shown relative to)."""
    problems = []
    for n, line in prose_lines(path):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here (no network)
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(root)}:{n}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


def test_github_slug_matches_the_rendered_anchors():
    assert github_slug("2026-12-01 — tensor-parallel communication volume (CPU, gloo)") == \
        "2026-12-01--tensor-parallel-communication-volume-cpu-gloo"
    assert github_slug("Evaluation: `scaletrain eval`") == "evaluation-scaletrain-eval"
    assert github_slug("Import from Hugging Face: `convert from-hf` and `init_from_hf`") == \
        "import-from-hugging-face-convert-from-hf-and-init_from_hf"


def test_broken_links_are_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [bad](#nope) [gone](missing.md)\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(page, root=tmp_path) == ["page.md:2: #nope: no heading with anchor #nope in page.md",
                                                 "page.md:2: missing.md: no such file"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(page):
    assert broken_links(page) == []


def test_every_config_key_is_documented():
    spec = importlib.util.spec_from_file_location("config_keys", ROOT / "docs" / "_scripts" / "config_keys.py")
    assert spec and spec.loader
    config_keys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_keys)
    missing = config_keys.missing_keys()
    assert not missing, (f"docs/run-interface.md lacks {missing}: run `python docs/_scripts/config_keys.py --write` "
                         "(and describe new keys on their topic page)")


def test_readme_shows_the_commands_ci_runs():
    readme, ci = (ROOT / "README.md").read_text(encoding="utf-8"), (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in ("bash examples/pretrain_tiny.sh", "python -m pytest -q"):
        assert command in readme and command in ci, command
