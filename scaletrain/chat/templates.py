"""Chat templates where Hugging Face keeps them, chosen and rendered as transformers does.

Where a tokenizer directory keeps its template(s), in transformers' order of precedence
(transformers 5: `PreTrainedTokenizerBase.from_pretrained` / `_from_pretrained`, `ProcessorMixin`):
  1. `chat_template.jinja` (the "default" template) and `additional_chat_templates/<name>.jinja` (named
     ones) — the layout `save_pretrained` writes since transformers 4.5x/5. When any of these files exists,
     they replace whatever tokenizer_config.json holds.
  2. `tokenizer_config.json` → `chat_template`: a string, or a list of {"name", "template"} (named templates).
  3. Files only `AutoProcessor` reads (multimodal checkpoints): `processor_config.json` → `chat_template`,
     then the legacy `chat_template.json`. A text tokenizer never reads them; they are used here only when
     1 and 2 hold none, so a processor's template is not silently replaced by ChatML.
Which of several named templates (`get_chat_template`): the one asked for by name; else `tool_use` when
tools are given; else `default` — otherwise an error that lists the names.

Rendering follows `render_jinja_template`: a sandboxed Jinja environment with trim_blocks, lstrip_blocks
and loop controls, transformers' `tojson`, `raise_exception` and `strftime_now`, `{% generation %}` blocks
accepted, undefined variables rendering as nothing, and the tokenizer's special tokens (`bos_token`,
`eos_token`, … from tokenizer_config.json, or the legacy special_tokens_map.json) as variables.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

JINJA_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
TOKENIZER_CONFIG = "tokenizer_config.json"
PROCESSOR_CONFIG = "processor_config.json"
LEGACY_PROCESSOR_FILE = "chat_template.json"
# Every file or folder that can carry a template (an export writes exactly one of them).
TEMPLATE_FILES = (JINJA_FILE, TEMPLATE_DIR, LEGACY_PROCESSOR_FILE)


class BadConversation(ValueError):
    """A row that cannot become a training example; the message is the reason counted in reports."""


@dataclass(frozen=True)
class TemplateSet:
    """The chat templates of a tokenizer directory: name → Jinja source ('default' for an unnamed one)."""

    templates: dict[str, str]
    origin: str  # where they were read, for logs: "chat_template.jinja", "tokenizer_config.json (named: …)"


@dataclass(frozen=True)
class ChosenTemplate:
    source: str
    origin: str  # for logs: which template and where it came from


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _named(value: Any, where: Path) -> dict[str, str] | None:
    """tokenizer_config.json's `chat_template`: a string or a list of {"name", "template"} (None: absent)."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, dict):  # what transformers builds from the list; tolerated in files too
        value = [{"name": k, "template": v} for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"{where}: `chat_template` must be a string or a list of {{\"name\", \"template\"}} entries")


def find_templates(folder: str | Path) -> TemplateSet | None:
    """The chat templates of a tokenizer directory in transformers' order of precedence (module docstring)."""
    d = Path(folder)
    files: dict[str, str] = {}
    if (d / TEMPLATE_DIR).is_dir():
        files.update({f.name.removesuffix(".jinja"): f.read_text(encoding="utf-8")
                      for f in sorted((d / TEMPLATE_DIR).glob("*.jinja"))})
    if (d / JINJA_FILE).is_file():
        files["default"] = (d / JINJA_FILE).read_text(encoding="utf-8")
    if files:
        where = [JINJA_FILE] if "default" in files else []
        where += [f"{TEMPLATE_DIR}/{n}.jinja" for n in files if n != "default"]
        return TemplateSet(files, " + ".join(where))
    for name, key_file in ((TOKENIZER_CONFIG, d / TOKENIZER_CONFIG), (PROCESSOR_CONFIG, d / PROCESSOR_CONFIG),
                           (LEGACY_PROCESSOR_FILE, d / LEGACY_PROCESSOR_FILE)):
        if key_file.is_file():
            named = _named(_read_json(key_file).get("chat_template"), key_file)
            if named:
                return TemplateSet(named, name if list(named) == ["default"] else f"{name} (named: {', '.join(named)})")
    return None


def select(found: TemplateSet, tools: bool) -> str:
    """The name transformers' `get_chat_template` picks when none is asked for: tool_use with tools, else default."""
    t = found.templates
    if tools and "tool_use" in t:
        return "tool_use"
    if "default" in t:
        return "default"
    raise ValueError(f"the tokenizer's chat templates ({found.origin}) have no 'default'"
                     f"{' or tool_use' if tools else ''}: name one of {', '.join(t)} in posttrain.chat.template")


def choose_template(setting: str, folder: str | Path | None, *, tools: bool, bundled: dict[str, str],
                    fallback: str = "chatml") -> ChosenTemplate:
    """The template a setting names: 'auto' (the tokenizer's, chosen as transformers chooses; else the bundled
    `fallback`), a bundled name, one of the tokenizer's named templates, or a Jinja string."""
    if setting in bundled:
        return ChosenTemplate(bundled[setting], f"bundled {setting}")
    found = find_templates(folder) if folder is not None else None
    if setting == "auto":
        if found is None:
            return ChosenTemplate(bundled[fallback], f"bundled {fallback} (the tokenizer in {folder} has no chat template)")
        name = select(found, tools)
        label = f"'{name}' of " if len(found.templates) > 1 else ""
        return ChosenTemplate(found.templates[name], f"the tokenizer's {label}{found.origin} in {folder}")
    if found is not None and setting in found.templates:
        return ChosenTemplate(found.templates[setting], f"the tokenizer's '{setting}' of {found.origin} in {folder}")
    return ChosenTemplate(setting, "posttrain.chat.template / --template (a Jinja string)")


def write_single_template(folder: str | Path, source: str) -> None:
    """Make `source` the only chat template of a tokenizer directory: every other place a template can be
    (module docstring) is cleared, and it is written to tokenizer_config.json's `chat_template`, which
    every transformers release with chat templates reads (5.x too, when no chat_template.jinja exists)."""
    d = Path(folder)
    for name in TEMPLATE_FILES:
        if (d / name).is_dir():
            shutil.rmtree(d / name)
        elif (d / name).exists():
            (d / name).unlink()
    if (d / PROCESSOR_CONFIG).is_file():
        proc = _read_json(d / PROCESSOR_CONFIG)
        if proc.pop("chat_template", None) is not None:
            (d / PROCESSOR_CONFIG).write_text(json.dumps(proc, indent=2, ensure_ascii=False))
    cfg = _read_json(d / TOKENIZER_CONFIG) if (d / TOKENIZER_CONFIG).is_file() else {}
    cfg["chat_template"] = source
    (d / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def template_variables(folder: str | Path | None) -> dict[str, str]:
    """The special tokens transformers hands a template (`special_tokens_map`): every `*_token` string of
    tokenizer_config.json, overridden by the legacy special_tokens_map.json where the config predates
    `added_tokens_decoder` (as transformers loads them)."""
    out: dict[str, str] = {}
    if folder is None:
        return out
    d = Path(folder)
    sources = []
    cfg = _read_json(d / TOKENIZER_CONFIG) if (d / TOKENIZER_CONFIG).is_file() else {}
    sources.append(cfg)
    if "added_tokens_decoder" not in cfg and (d / "special_tokens_map.json").is_file():
        sources.append(_read_json(d / "special_tokens_map.json"))
    for source in sources:
        for key, value in source.items():
            value = value.get("content") if isinstance(value, dict) else value
            if key.endswith("_token") and isinstance(value, str):
                out[key] = value
    return out


def compile_template(source: str):
    """A Jinja template in the environment transformers renders chat templates in (module docstring)."""
    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}` (TRL's assistant masks): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise BadConversation(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
