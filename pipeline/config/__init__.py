"""Typed, YAML-backed configuration with dotted command-line overrides."""

from pipeline.config.core import (
    ConfigError,
    add_config_arguments,
    build_config,
    config_from_args,
    flatten,
    from_dict,
    load_yaml,
    option,
    overrides_from_args,
    save_config,
    section,
    to_dict,
)

__all__ = [
    "ConfigError",
    "add_config_arguments",
    "build_config",
    "config_from_args",
    "flatten",
    "from_dict",
    "load_yaml",
    "option",
    "overrides_from_args",
    "save_config",
    "section",
    "to_dict",
]
