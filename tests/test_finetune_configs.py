"""Every shipped fine-tuning preset parses into the command's config."""

from __future__ import annotations

import pytest
from conftest import REPO

from pipeline.config import build_config
from pipeline.finetune.config import FinetuneJobConfig

PRESETS = sorted((REPO / "configs" / "finetune").glob("*.yaml"))
FRAGMENTS = {"base", "gpt1"}  # included by the task presets, not run on their own


@pytest.mark.parametrize("path", [p for p in PRESETS if p.stem not in FRAGMENTS], ids=lambda p: p.stem)
def test_preset_parses(path):
    cfg = build_config(FinetuneJobConfig, path)
    assert cfg.data.train.path and cfg.train.output_dir.startswith(str(REPO / "runs") + "/")  # the repository's
    assert cfg.optim.name == "adamw" and cfg.schedule.decay == "linear"  # base.yaml's recipe
    if path.stem.startswith("gpt-"):
        assert cfg.finetune.aux_lm_weight == 0.5 and cfg.optim.lr == 6.25e-5


def test_fragments_are_included_by_presets():
    texts = "".join(p.read_text() for p in PRESETS)
    assert all(f"{name}.yaml" in texts for name in FRAGMENTS)
