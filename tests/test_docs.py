"""The configuration reference in docs/ is checked against the dataclasses, so it can't drift."""

import dataclasses
import re
from pathlib import Path

import pytest

from data.precompute import PrecomputeConfig
from data.sharding import ShardConfig
from serving.app import ServeConfig
from training.autoencoder import AutoencoderConfig
from training.evaluation import EvaluationConfig
from training.registry import PromotionConfig
from training.diffusion import NoiseSchedule
from training.train import DiffusionConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize(
    "config, page",
    [
        (ShardConfig, "shard.md"),
        (AutoencoderConfig, "autoencoder.md"),
        (PrecomputeConfig, "autoencoder.md"),
        (DiffusionConfig, "training.md"),
        (NoiseSchedule, "training.md"),
        (EvaluationConfig, "serving.md"),
        (PromotionConfig, "serving.md"),
        (ServeConfig, "serving.md"),
    ],
)
def test_every_config_field_is_documented_with_its_default(config, page):
    text = (DOCS / page).read_text()
    if config.__name__ in text:  # a page documenting several configs: this one's table
        text = text[text.index(f"`{config.__name__}`"):]
        text = text[: text.index("\n\n`", 1)] if "\n\n`" in text[1:] else text
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text, flags=re.MULTILINE))
    fields = {field.name: field.default for field in dataclasses.fields(config)}
    assert set(rows) >= set(fields), f"undocumented: {set(fields) - set(rows)}"
    for name, default in fields.items():
        documented = rows[name].strip().strip("`").replace(",", "")
        if default is dataclasses.MISSING:  # a nested config, documented in its own table
            assert documented == "(below)", name
            continue
        documented = "" if documented == "(empty)" else documented
        assert documented == str(default), f"{name}: documented {documented!r}, default {default!r}"
