import json

import pytest

from data import config as configs
from data.sharding import ShardConfig


def test_yaml_section_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shard:\n  resolution: 64\n  format: jpg\nautoencoder:\n  preset: tiny\n")
    config = configs.load(ShardConfig, str(path), section="shard", overrides={"resolution": 32, "workers": None})
    assert (config.resolution, config.format, config.workers) == (32, "jpg", ShardConfig().workers)


def test_flat_file_and_file_without_this_section(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("shard_size: 7\n")
    assert configs.load(ShardConfig, str(flat), section="shard").shard_size == 7
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  steps: 3\n")
    assert configs.load(ShardConfig, str(other), section="shard") == ShardConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        ("shard:\n  resolutoin: 3\n", "unknown ShardConfig field"),
        ("shard:\n  resolution: big\n", "resolution: expected an integer"),
        ("shard:\n  format: gif\n", "format: 'gif' is not one of"),
        ("shard:\n  resolution: 0\n", "resolution must be at least 1"),
        ("shard: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(configs.ConfigError, match=message):
        configs.load(ShardConfig, str(path), section="shard")


def test_round_trip_through_json():
    config = ShardConfig(resolution=48, format="jpg")
    assert configs.from_dict(ShardConfig, json.loads(json.dumps(configs.to_dict(config)))) == config


def test_shipped_configs_load():
    for name in ("configs/tiny.yaml", "configs/base.yaml"):
        configs.load(ShardConfig, name, section="shard")
