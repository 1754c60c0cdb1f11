"""The typed config core: YAML + dotted overrides, validation, --help, and every shipped config parses."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import ConfigError, add_config_arguments, build_config, config_from_args, option, section
from pipeline.config.core import flatten, from_dict, load_yaml, to_dict

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    """An inner section."""

    size: int = option(4, "a size")
    ratio: float = option(0.5, "a ratio")
    kind: Literal["a", "b"] = option("a", "a choice")
    names: list[str] = option(["x"], "some names")
    limit: int | None = option(None, "optional")
    flag: bool = option(False, "a flag", aliases=("--flag",))

    def __post_init__(self):
        if self.size < 1:
            raise ValueError("inner.size must be >= 1")


@dataclass
class Root:
    inner: Inner = section(Inner)
    name: str = option("n", "a name")


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("inner:\n  size: 7\n  kind: b\nname: fromyaml\n")
    cfg = build_config(Root, cfg_file, {"inner.size": "9", "inner.names": "p,q", "inner.limit": "none"})
    assert cfg.inner.size == 9 and cfg.inner.kind == "b" and cfg.name == "fromyaml"
    assert cfg.inner.names == ["p", "q"] and cfg.inner.limit is None and cfg.inner.ratio == 0.5


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="inner.size: expected an integer"):
        build_config(Root, None, {"inner.size": "many"})
    with pytest.raises(ConfigError, match="inner.kind"):
        build_config(Root, None, {"inner.kind": "c"})
    with pytest.raises(ConfigError, match="unknown config key.*sizes"):
        build_config(Root, None, {"inner.sizes": "3"})
    with pytest.raises(ValueError, match="inner.size must be >= 1"):
        build_config(Root, None, {"inner.size": "0"})


def test_argparse_dotted_and_alias_flags():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Root)
    args = parser.parse_args(["--inner.size=3", "--flag", "--inner.names", "a", "b", "--name", "z"])
    cfg = config_from_args(Root, args)
    assert (cfg.inner.size, cfg.inner.flag, cfg.inner.names, cfg.name) == (3, True, ["a", "b"], "z")
    assert "a ratio" in parser.format_help()
    args = parser.parse_args(["--inner.flag=false"])
    assert config_from_args(Root, args).inner.flag is False


def test_include_and_flatten(tmp_path):
    (tmp_path / "base.yaml").write_text("inner:\n  size: 2\n  ratio: 0.25\n")
    (tmp_path / "top.yaml").write_text("include: base.yaml\ninner:\n  size: 5\n")
    data = load_yaml(tmp_path / "top.yaml")
    assert data == {"inner": {"size": 5, "ratio": 0.25}}
    assert flatten(to_dict(build_config(Root, tmp_path / "top.yaml")))["inner.ratio"] == 0.25


def _check_config(path: Path) -> None:
    """Build the config a shipped YAML is for, with stand-ins for the paths given on the command line."""
    from pipeline.finetune.config import FinetuneJobConfig
    from pipeline.model.config import load_model_preset
    from pipeline.preprocess.config import ShardJobConfig
    from pipeline.tokenizer.train import TokenizerJobConfig
    from pipeline.train.config import TrainJobConfig

    kind = path.parent.name
    if kind == "model":
        load_model_preset(path)
    elif kind == "tokenizer":
        build_config(TokenizerJobConfig, path, {"output": "/tmp/x"})
    elif kind == "preprocess":
        build_config(ShardJobConfig, path, {"output.dir": "/tmp/x", "data.tokenizer": "/tmp/t"})
    elif kind == "pretrain":
        cfg = build_config(TrainJobConfig, path)
        assert (REPO / cfg.deepspeed.config).is_file(), cfg.deepspeed.config
    elif kind == "finetune":  # task presets and the fragments they include (details: test_finetune_configs.py)
        fragment = path.stem in ("base", "gpt1")  # included by the task presets, which give the labels
        build_config(FinetuneJobConfig, path, {"task.labels": ["a", "b"]} if fragment else None)
    elif kind == "evaluate":  # suites: the suite section of `evaluate`, every task a preset
        from pipeline.evaluate.command import SuiteConfig
        from pipeline.evaluate.transfer import preset_path

        for task in from_dict(SuiteConfig, load_yaml(path)).tasks:
            assert preset_path(task).is_file()
    else:
        raise AssertionError(f"no check for configs/{kind}: add one here")


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_parses(path):
    assert isinstance(load_yaml(path), dict)
    _check_config(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_are_json_with_a_zero_section(path):
    import json

    assert "zero_optimization" in json.loads(path.read_text())


def test_a_mistyped_option_is_one_line_with_the_closest_real_one():
    from conftest import run_cli_in_process

    proc = run_cli_in_process("train", "--config", "configs/pretrain/debug.yaml", "--data.shardz", "x",
                              "--trian.max_steps=3", check=False)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "python -m pipeline train: error: unrecognized options: --data.shardz (did you mean --data.shards?), "
        "--trian.max_steps (did you mean --train.max_steps?) (--help lists the options)"
    ]
    proc = run_cli_in_process("shard", "--wrkers", "2", check=False)
    assert proc.returncode == 2 and "did you mean --workers?" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = run_cli_in_process("trian", check=False)
    assert proc.returncode == 2 and "did you mean 'train'?" in proc.stderr
