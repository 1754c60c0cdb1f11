"""Typed configuration: nested dataclasses <-> YAML <-> `--section.field=value` command-line overrides.

Every component owns a small dataclass whose fields carry their help text (``option(...)``). A command's
root config nests those sections. The resolution order is: dataclass defaults, then the YAML file given
with ``--config``, then dotted overrides on the command line. Construction happens once, at the end, so
each section's ``__post_init__`` validates the final values and raises ``ValueError`` naming the field.

Relative paths (fields declared with ``option(..., path=...)``) are made absolute where they are read, so a
job finds the same files whatever directory it runs in:

- written in a YAML file inside the repository (the presets), or a field's default: against the repository
  root, which is how the presets are written;
- written in a YAML file outside the repository: against that file's directory (as ``include:`` is);
- given on the command line (or as an override in code): against the current working directory.

URIs (``models:/...``, ``runs:/...``, ``http://...``) and a field's keywords (``checkpoint.resume: auto``) are
not paths. ``include:`` merges mappings key by key; a mapping tagged ``!replace`` replaces the included one
instead (``label_map: !replace {0: negative, 1: positive}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

_MISSING = dataclasses.MISSING

# The repository: relative paths in its YAML files and in the fields' defaults are relative to it.
REPO_ROOT = Path(__file__).resolve().parents[2]


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    aliases: tuple[str, ...] = (),
    factory=None,
    path: bool | Callable[[str], bool] = False,
) -> Any:
    """A documented config field.

    ``aliases`` are extra command-line spellings (``--vocab-size`` for ``tokenizer.vocab_size``) so the
    common flags of a command read naturally while every field stays reachable by its dotted name.
    ``path``: the value names a file or directory (True), or a test of which values do (``resume``: not
    ``auto`` or ``none``); relative ones are made absolute by the rule in this module's docstring.
    """
    meta = {"help": help, "aliases": tuple(aliases), "path": path}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A nested config section, defaulting to the section's own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": (cls.__doc__ or "").strip()})


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


# ---------------------------------------------------------------------------------------------------------
# Type coercion


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML value or a command-line string into ``tp``, or raise ConfigError naming ``name``."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors) or f"{name}: cannot be None")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        # Keys too: YAML reads `0: negative` with an int key, which a dict[str, str] must hold as "0".
        key_tp, value_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, name): _coerce(v, value_tp, f"{name}[{k!r}]") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
            try:  # allow 1e6-style integers
                as_float = float(value)
                if as_float.is_integer():
                    return int(as_float)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    raise ConfigError(f"{name}: unsupported config type {tp!r}")


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def from_dict(cls: type[T], data: dict[str, Any] | None, *, prefix: str = "") -> T:
    """Build ``cls`` from a (possibly partial) nested dict; unknown keys are an error, not ignored."""
    data = dict(data or {})
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in section '{prefix}'" if prefix else ""
        raise ConfigError(f"unknown config key(s){where}: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # a required field without a value
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None
    except ValueError as exc:  # __post_init__ validation: already names the field
        raise ConfigError(str(exc)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-safe) of a config."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return convert(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params and diffs)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


class _Replace(dict):
    """A mapping tagged ``!replace``: it replaces the mapping it overrides instead of being merged into it."""


class _Loader(yaml.SafeLoader):
    """YAML's safe loader with the ``!replace`` tag."""


def _construct_replace(loader: yaml.SafeLoader, node: yaml.Node) -> _Replace:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(
            None, None, "!replace applies to a mapping (lists and single values always replace)", node.start_mark
        )
    return _Replace(loader.construct_mapping(node, deep=True))


_Loader.add_constructor("!replace", _construct_replace)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and not isinstance(value, _Replace) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    """``value`` without ``!replace`` marks (they act on the includes of the file that wrote them only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# Relative paths

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # models:/x, runs:/id/p, http://h, sqlite:///f, s3://b


def yaml_base(path: str | Path) -> Path:
    """What relative paths written in the YAML file ``path`` are relative to: the repository root for a file
    inside the repository, else the file's own directory."""
    resolved = Path(path).resolve()
    return REPO_ROOT if resolved.is_relative_to(REPO_ROOT) else resolved.parent


def _is_path(value: str, rule: bool | Callable[[str], bool]) -> bool:
    if not value or _URI.match(value):
        return False
    return rule is True or (callable(rule) and rule(value))


def _absolute(value: str, base: Path) -> str:
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _section_type(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (``X`` or ``X | None``), if any."""
    if _is_union(tp):
        found = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def _resolve_value(value: Any, f: dataclasses.Field, tp: Any, base: Path) -> Any:
    sub = _section_type(tp)
    if sub is not None and isinstance(value, dict):
        return _resolve_section(value, sub, base)
    rule = f.metadata.get("path", False)
    if not rule:
        return value
    if isinstance(value, str) and get_origin(tp) in (list, tuple):  # "a,b" on the command line
        value = [v for v in value.split(",") if v]
    if isinstance(value, str):
        return _absolute(value, base) if _is_path(value, rule) else value
    if isinstance(value, list):
        return [_absolute(v, base) if isinstance(v, str) and _is_path(v, rule) else v for v in value]
    return value


def _resolve_section(data: dict[str, Any], cls: type, base: Path) -> dict[str, Any]:
    """``data`` (values for ``cls``) with its relative paths made absolute against ``base``."""
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = type(data)()  # keeps a !replace mark
    for key, value in data.items():
        f = fields.get(key)  # an unknown key is reported by from_dict
        out[key] = value if f is None else _resolve_value(value, f, hints[key], base)
    return out


def _resolve_override(cls: type, dotted: str, value: Any, base: Path) -> Any:
    """A ``--section.field`` value with a relative path made absolute against ``base``."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        f = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        sub = _section_type(_field_types(cls)[part]) if f is not None else None
        if sub is None:
            return value
        cls = sub
    f = {f.name: f for f in dataclasses.fields(cls)}.get(leaf)
    return value if f is None else _resolve_value(value, f, _field_types(cls)[leaf], base)


def _default_paths(data: dict[str, Any], cls: type) -> None:
    """Write the relative defaults of path fields that nothing set into ``data``, against the repository."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        sub = _section_type(hints[f.name])
        if sub is not None:
            child = data.get(f.name)
            if child is None and f.name not in data:
                child = {}
                _default_paths(child, sub)
                if child:
                    data[f.name] = child
            elif isinstance(child, dict):
                _default_paths(child, sub)
            continue
        rule = f.metadata.get("path", False)
        default = f.default
        if rule and f.name not in data and isinstance(default, str) and _is_path(default, rule):
            data[f.name] = _absolute(default, REPO_ROOT)


def load_yaml(path: str | Path, cls: type | None = None) -> dict[str, Any]:
    """A YAML file's values with its ``include:`` files merged under them.

    With ``cls`` (the root config the file is for), relative paths are made absolute: against the repository
    root for a file inside the repository, else against the file's directory (each included file by its own
    place).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        try:
            data = yaml.load(fh, Loader=_Loader) or {}  # a SafeLoader with one more tag
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    # `include: other.yaml` composes presets (a pretrain config naming its model size, say).
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if cls is not None:
        data = _resolve_section(data, cls, yaml_base(path))
    merged: dict[str, Any] = {}
    for inc in includes:
        inc_path = (path.parent / inc) if not Path(inc).is_absolute() else Path(inc)
        merged = _merge(merged, load_yaml(inc_path, cls))
    return _plain(_merge(merged, data))


def build_config(cls: type[T], yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults <- YAML <- dotted overrides, validated once; relative paths made absolute (module docstring)."""
    data: dict[str, Any] = load_yaml(yaml_path, cls) if yaml_path else {}
    cwd = Path.cwd()
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, _resolve_override(cls, dotted, value, cwd))
    _default_paths(data, cls)
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# argparse integration

_DEST_PREFIX = "cfg__"


def _leaf_fields(cls: type, prefix: str = ""):
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, name)
        else:
            yield name, f, tp


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not _MISSING:
        return repr(f.default)
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def _type_label(tp: Any) -> str:
    if _is_union(tp):
        return "|".join(_type_label(a) for a in get_args(tp) if a is not type(None)) + "|none"
    if get_origin(tp) is Literal:
        return "{" + ",".join(str(c) for c in get_args(tp)) + "}"
    if get_origin(tp) in (list, tuple):
        return f"{_type_label(get_args(tp)[0])}..."
    return getattr(tp, "__name__", str(tp))


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, with_config_file: bool = True) -> None:
    """Expose every leaf field of ``cls`` as ``--section.field`` (plus its aliases), grouped by section.

    Values stay strings here (``argparse.SUPPRESS`` default) so that only what the user typed overrides the
    YAML; coercion and validation happen in ``config_from_args``.
    """
    if with_config_file:
        parser.add_argument("--config", metavar="YAML", help="YAML file with the config sections (see configs/)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f, tp in _leaf_fields(cls):
        section_name = name.rsplit(".", 1)[0] if "." in name else "general"
        group = groups.get(section_name)
        if group is None:
            group = parser.add_argument_group(f"{section_name} options")
            groups[section_name] = group
        flags = [*f.metadata.get("aliases", ()), f"--{name}"]
        kwargs: dict[str, Any] = {
            "dest": _DEST_PREFIX + name.replace(".", "__"),
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata.get('help', '')} [{_type_label(tp)}, default: {_default_repr(f)}]".replace("%", "%%"),
        }
        origin = get_origin(tp)
        if origin in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["metavar"] = "VALUE"
        elif tp is bool:
            kwargs["nargs"] = "?"
            kwargs["const"] = "true"
            kwargs["metavar"] = "BOOL"
        else:
            kwargs["metavar"] = name.rsplit(".", 1)[-1].upper()
        group.add_argument(*flags, **kwargs)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--section.field`` values the user typed (``add_config_arguments``), as {"section.field": value}."""
    return {key[len(_DEST_PREFIX) :].replace("__", "."): value for key, value in vars(args).items()
            if key.startswith(_DEST_PREFIX)}  # fmt: skip


def config_from_args(cls: type[T], args: argparse.Namespace, extra: dict[str, Any] | None = None) -> T:
    overrides = {**(extra or {}), **overrides_from_args(args)}
    return build_config(cls, getattr(args, "config", None), overrides)
