"""Typed configuration: nested dataclasses <-> YAML <-> `--section.field=value` command-line overrides.

Every component owns a small dataclass whose fields carry their help text (``option(...)``). A command's
root config nests those sections. The resolution order is: dataclass defaults, then the YAML file given
with ``--config``, then dotted overrides on the command line. Construction happens once, at the end, so
each section's ``__post_init__`` validates the final values and raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, aliases: tuple[str, ...] = (), factory=None) -> Any:
    """A documented config field.

    ``aliases`` are extra command-line spellings (``--vocab-size`` for ``tokenizer.vocab_size``) so the
    common flags of a command read naturally while every field stays reachable by its dotted name.
    """
    meta = {"help": help, "aliases": tuple(aliases)}
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
        return dict(value)
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


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    # `include: other.yaml` composes presets (a pretrain config naming its model size, say).
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        inc_path = (path.parent / inc) if not Path(inc).is_absolute() else Path(inc)
        merged = _merge(merged, load_yaml(inc_path))
    return _merge(merged, data)


def build_config(cls: type[T], yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults <- YAML <- dotted overrides, validated once."""
    data: dict[str, Any] = load_yaml(yaml_path) if yaml_path else {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
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


def config_from_args(cls: type[T], args: argparse.Namespace, extra: dict[str, Any] | None = None) -> T:
    overrides: dict[str, Any] = dict(extra or {})
    for key, value in vars(args).items():
        if key.startswith(_DEST_PREFIX):
            overrides[key[len(_DEST_PREFIX) :].replace("__", ".")] = value
    return build_config(cls, getattr(args, "config", None), overrides)
