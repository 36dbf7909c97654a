"""Strict loading of TOML run files: one level of `base`, dotted `--set` overrides, typed coercion.

Unknown sections/keys and values of the wrong type are errors that name the key, the file and the
closest valid key. The resolved config is written back as TOML, so a run directory's config.toml
is itself a valid run file.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from scaletrain.config.schema import RunConfig


class ConfigError(ValueError):
    """A run file or override that cannot become a RunConfig; the message says what to change."""


def _section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(choices))}."


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Return `value` as `typ` (int, float, bool, str, tuple[X, ...]) or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}.")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}.")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}.")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}.")
    raise ConfigError(f"{where}: unsupported field type {typ!r}.")


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Pass an existing run file, e.g. configs/tiny.toml.")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}).") from e


def _check_tree(tree: dict[str, Any], origin: str) -> None:
    """Reject unknown sections/keys early, with the file that introduced them."""
    sections = _section_types()
    for name, body in tree.items():
        if name not in sections:
            raise ConfigError(f"{origin}: unknown section [{name}].{_suggest(name, list(sections))}")
        if not isinstance(body, dict):
            raise ConfigError(f"{origin}: '{name}' must be a table ([{name}]), got {body!r}.")
        _check_keys(body, sections[name], name, origin)


def _check_keys(body: dict[str, Any], cls: type, where: str, origin: str) -> None:
    """Unknown keys of one section; a nested section (a dataclass-typed field, e.g. [model.moe]) recursively."""
    types = _field_types(cls)
    for key, value in body.items():
        if key not in types:
            raise ConfigError(f"{origin}: unknown key '{where}.{key}'.{_suggest(key, list(types))}")
        if dataclasses.is_dataclass(types[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: '{where}.{key}' is a section: write [{where}.{key}] or "
                                  f"{where}.{key}.<key> = …, got {value!r}.")
            _check_keys(value, types[key], f"{where}.{key}", origin)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in base.items()}
    for section, body in top.items():
        merged = out.setdefault(section, {})
        for key, value in body.items():  # a nested section merges key by key too
            both = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = _merge({"_": merged[key]}, {"_": value})["_"] if both else value
    return out


def load_tree(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, str], str]]:
    """Read a run file and its one optional `base`; return the merged tree and key → file."""
    path = Path(path)
    top = _read_toml(path)
    base_name = top.pop("base", None)
    _check_tree(top, str(path))
    origins = {(s, k): str(path) for s, body in top.items() for k in _dotted(body)}
    if base_name is None:
        return top, origins
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: 'base' must be a file name string, got {base_name!r}.")
    base_path = (path.parent / base_name).resolve()
    base = _read_toml(base_path)
    if "base" in base:
        raise ConfigError(
            f"{base_path}: a base file cannot have its own 'base' (one level of inheritance only); "
            f"copy what {path} needs from it instead."
        )
    _check_tree(base, str(base_path))
    base_origins = {(s, k): str(base_path) for s, body in base.items() for k in _dotted(body)}
    return _merge(base, top), {**base_origins, **origins}


def parse_override(item: str) -> tuple[str, str, Any]:
    """'section.key=value' → (section, key, value); value parsed as a TOML literal, else a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set parallel.tp=2.")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be section.key, e.g. train.steps (or section.sub.key, "
                          "e.g. model.moe.num_experts).")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as runs/x or cosine
    return parts[0], ".".join(parts[1:]), value


def _dotted(body: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys of a section, a nested section's as sub.key."""
    return [k for key, v in body.items()
            for k in (_dotted(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]


def _nest(key: str, value: Any) -> dict[str, Any]:
    """'sub.key', v → {'sub': {'key': v}}."""
    head, _, rest = key.partition(".")
    return {head: _nest(rest, value) if rest else value}


def _build(cls: type, body: dict[str, Any], where: str, origins: dict[tuple[str, str], str], section: str,
           prefix: str = "") -> Any:
    types = _field_types(cls)
    kwargs = {}
    for key, value in body.items():
        if dataclasses.is_dataclass(types[key]):
            kwargs[key] = _build(types[key], value, f"{where}.{key}", origins, section, f"{prefix}{key}.")
        else:
            origin = origins.get((section, prefix + key), "config")
            kwargs[key] = _coerce(value, types[key], f"{origin}: {where}.{key}")
    return cls(**kwargs)


def build_config(tree: dict[str, Any], origins: dict[tuple[str, str], str] | None = None) -> RunConfig:
    """Typed RunConfig from a checked tree; each value's error names the file it came from."""
    origins = origins or {}
    sections = {}
    for name, cls in _section_types().items():
        sections[name] = _build(cls, tree.get(name, {}), name, origins, name)
    return RunConfig(**sections)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The full pipeline: run file (+ base) → `--set` overrides → typed, frozen RunConfig."""
    tree, origins = load_tree(path) if path is not None else ({}, {})
    for item in overrides:
        section, key, value = parse_override(item)
        one = {section: _nest(key, value)}
        _check_tree(one, f"--set {item}")
        tree = _merge(tree, one)
        origins[(section, key)] = "--set"
    return build_config(tree, origins)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), as written to the run directory."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        out[f.name] = _plain(dataclasses.asdict(section))
    return out


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists, nested sections (dicts) likewise."""
    return {k: _plain(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as a TOML run file (loadable with --config)."""
    Path(path).write_text(tomli_w.dumps(config_to_dict(cfg)))
