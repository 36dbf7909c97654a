"""mkdocs hook: the repository's BENCHMARKS.md becomes the site page `BENCHMARKS.md`.

The docs link to the measurements as `../BENCHMARKS.md#section` (`../../` from a sub-folder), which is right
where the Markdown is read in the repository; on the site that file sits outside docs_dir, so this hook
adds it as a generated page and rewrites those links to it. Anchors keep working: the site's headings use
GitHub's slugs (mkdocs.yml's toc slugify), and strict mode checks them.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"
REPO_LINK = re.compile(r"\]\((?:\.\./)+BENCHMARKS\.md")


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "BENCHMARKS.md", abs_src_path=str(BENCHMARKS)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    to_root = "../" * page.file.src_uri.count("/")  # from this page to the docs root, where the page lives
    return REPO_LINK.sub(f"]({to_root}BENCHMARKS.md", markdown)
