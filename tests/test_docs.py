"""The configuration reference in docs/ is checked against the dataclasses, so it can't drift."""

import dataclasses
import re
from pathlib import Path

import pytest

from data.precompute import PrecomputeConfig
from data.sharding import ShardConfig
from flows.settings import Endpoints, PipelineConfig
from serving.app import ServeConfig
from training.autoencoder import AutoencoderConfig
from training.evaluation import EvaluationConfig
from training.registry import PromotionConfig
from training.diffusion import NoiseSchedule
from training.train import DiffusionConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize(
    "config, section",
    [
        (ShardConfig, "shard"),
        (AutoencoderConfig, "autoencoder"),
        (PrecomputeConfig, "precompute"),
        (DiffusionConfig, "train"),
        (NoiseSchedule, "train-noise"),
        (EvaluationConfig, "evaluate"),
        (PromotionConfig, "promote"),
        (ServeConfig, "serve"),
        (PipelineConfig, "pipeline"),
        (Endpoints, "pipeline-endpoints"),
    ],
)
def test_every_config_field_is_documented_with_its_default(config, section):
    """docs/configuration.md has a section per config, whose table lists every field."""
    text = (DOCS / "configuration.md").read_text()
    text = text[text.index(f"\n## {section}\n"):]
    text = text[: text.index("\n## ", 1)] if "\n## " in text[1:] else text
    assert f"`{config.__name__}`" in text
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text, flags=re.MULTILINE))
    fields = {field.name: field.default for field in dataclasses.fields(config)}
    assert set(rows) >= set(fields), f"undocumented: {set(fields) - set(rows)}"
    for name, default in fields.items():
        documented = rows[name].strip().strip("`").replace(",", "")
        if default is dataclasses.MISSING:  # a nested config, documented in its own table
            assert documented == "(below)", name
            continue
        documented = "" if documented == "(empty)" else documented
        expected = f"[{' '.join(default)}]" if isinstance(default, tuple) else str(default)  # a YAML list
        assert documented == expected, f"{name}: documented {documented!r}, default {default!r}"
