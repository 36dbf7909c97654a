"""Strict loading of TOML run files: one level of `base`, dotted `--set` overrides, typed coercion.

Unknown sections/keys and values of the wrong type are errors that name the key, the file and the
closest valid key. Sections may nest one level (`[posttrain.grpo]`, `--set posttrain.grpo.beta=0.02`).
Renamed keys are moved to their new place per file and per `--set` list, with a notice
(scaletrain/config/renamed.py). The resolved config is written back as TOML, so a run directory's
config.toml is itself a valid run file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from scaletrain.config import renamed
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


def _suggest_key(cls: type, name: str, key: str) -> str:
    """The closest valid key of section `name` to `key`, among its fields, its nested sections' fields and the
    renamed keys (suggested by their new name)."""
    # a top-level section's field by its name, as always; anything nested in full
    choices = {k: k if "." not in name else f"{name}.{k}" for k in _field_types(cls)}
    for k, typ in _field_types(cls).items():
        if isinstance(typ, type) and dataclasses.is_dataclass(typ):
            subs = _field_types(typ)
            choices.update({f"{k}.{sub}": f"{name}.{k}.{sub}" for sub in subs})
            choices.update({f"{k}_{sub}": f"{name}.{k}.{sub}" for sub in subs})
    for old, new in renamed.RENAMED.items():
        if old.startswith(f"{name}."):
            choices[old.split(".", 1)[1]] = new[0]
    close = difflib.get_close_matches(key, list(choices), n=1)
    if close:
        return f" Did you mean '{choices[close[0]]}'?"
    return f" Valid keys: {', '.join(sorted(k for k in _field_types(cls)))}."


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


def _check_body(cls: type, body: Any, name: str, origin: str) -> None:
    """Reject unknown keys of section `name` (class `cls`) and of its nested sections, naming the closest."""
    if not isinstance(body, dict):
        raise ConfigError(f"{origin}: '{name}' must be a table ([{name}]), got {body!r}.")
    types = _field_types(cls)
    for key, value in body.items():
        if key not in types:
            raise ConfigError(f"{origin}: unknown key '{name}.{key}'.{_suggest_key(cls, name, key)}")
        if dataclasses.is_dataclass(types[key]):
            _check_body(types[key], value, f"{name}.{key}", origin)


def _check_tree(tree: dict[str, Any], origin: str) -> None:
    """Reject unknown sections/keys early, with the file that introduced them."""
    sections = _section_types()
    for name, body in tree.items():
        if name not in sections:
            raise ConfigError(f"{origin}: unknown section [{name}].{_suggest(name, list(sections))}")
        _check_body(sections[name], body, name, origin)


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The dotted paths of every value in a nested tree (no field holds a table, so tables are sections)."""
    out: list[tuple[str, ...]] = []
    for key, value in tree.items():
        out += _leaves(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for path in _leaves(top):
        renamed.put(out, path, renamed.get(top, path))
    return out


def _read_run_file(path: Path) -> dict[str, Any]:
    """One run file's tree with its renamed keys moved to their new places (a conflict is a ConfigError)."""
    tree = _read_toml(path)
    try:
        return renamed.migrate(tree, str(path))
    except renamed.RenameConflict as e:
        raise ConfigError(str(e)) from e


def load_tree(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Read a run file and its one optional `base`; return the merged tree and key path → file."""
    path = Path(path)
    top = _read_run_file(path)
    base_name = top.pop("base", None)
    _check_tree(top, str(path))
    origins = {p: str(path) for p in _leaves(top)}
    if base_name is None:
        return top, origins
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: 'base' must be a file name string, got {base_name!r}.")
    base_path = (path.parent / base_name).resolve()
    base = _read_run_file(base_path)
    if "base" in base:
        raise ConfigError(
            f"{base_path}: a base file cannot have its own 'base' (one level of inheritance only); "
            f"copy what {path} needs from it instead."
        )
    _check_tree(base, str(base_path))
    base_origins = {p: str(base_path) for p in _leaves(base)}
    return _merge(base, top), {**base_origins, **origins}


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """'section.key=value' or 'section.sub.key=value' → (key path, value); value parsed as a TOML literal, else a
    string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set parallel.tp=2.")
    dotted, raw = item.split("=", 1)
    parts = tuple(dotted.strip().split("."))
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be section.key or section.sub.key, e.g. train.steps or "
                          "posttrain.grpo.beta.")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as runs/x or cosine
    return parts, value


def override_tree(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The `--set` overrides as one checked tree, renamed keys moved (a later --set of a key wins; an old key and
    its new key given different values is an error)."""
    tree: dict[str, Any] = {}
    given: dict[tuple[str, ...], tuple[str, bool, Any]] = {}  # new path → (its --set item, set by an old key, value)
    for item in items:
        path, value = parse_override(item)
        old = renamed.is_old(path, value)
        targets = [path]
        if old:
            targets = [tuple(n.split(".")) for n in renamed.RENAMED[".".join(path)]]
            renamed.announce(".".join(path))
        else:
            one: dict[str, Any] = {}
            renamed.put(one, path, value)
            _check_tree(one, f"--set {item}")
        for target in targets:
            other = given.get(target)
            if other is not None and other[1] != old and other[2] != value:
                raise ConfigError(f"--set {item} and --set {other[0]} set the same key {'.'.join(target)} to "
                                  f"different values (an old key and its new name); keep only the new key.")
            given[target] = (item, old, value)
            renamed.put(tree, target, value)
    return tree


def _build(cls: type, body: dict[str, Any], origins: dict[tuple[str, ...], str], prefix: tuple[str, ...]) -> Any:
    types = _field_types(cls)
    kwargs = {}
    for key, value in body.items():
        path = (*prefix, key)
        if dataclasses.is_dataclass(types[key]):
            kwargs[key] = _build(types[key], value, origins, path)
        else:
            kwargs[key] = _coerce(value, types[key], f"{origins.get(path, 'config')}: {'.'.join(path)}")
    return cls(**kwargs)


def build_config(tree: dict[str, Any], origins: dict[tuple[str, ...], str] | None = None) -> RunConfig:
    """Typed RunConfig from a checked tree; each value's error names the file it came from."""
    origins = origins or {}
    sections = {name: _build(cls, tree.get(name, {}), origins, (name,)) for name, cls in _section_types().items()}
    return RunConfig(**sections)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The full pipeline: run file (+ base) → `--set` overrides → typed, frozen RunConfig. Renamed keys land at
    their new place with a notice (scaletrain/config/renamed.py)."""
    tree, origins = load_tree(path) if path is not None else ({}, {})
    sets = override_tree(overrides)
    tree = _merge(tree, sets)
    origins.update({p: "--set" for p in _leaves(sets)})
    return build_config(tree, origins)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists, nested sections as tables), as written to the run directory."""
    return {f.name: _plain(dataclasses.asdict(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)}


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as a TOML run file (loadable with --config)."""
    Path(path).write_text(tomli_w.dumps(config_to_dict(cfg)))
