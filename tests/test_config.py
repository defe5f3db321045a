"""Stage configs: YAML sections, overrides, validation by pydantic with the field's path in
every error, and one identity per config."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from ldmflow import configs
from ldmflow.data.sharding import ShardConfig
from ldmflow.flows.settings import PipelineConfig, load_spec
from ldmflow.training.stage_configs import DiffusionConfig

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_section_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shard:\n  resolution: 64\n  format: jpg\nautoencoder:\n  preset: tiny\n")
    config = configs.load(ShardConfig, str(path), section="shard", overrides={"resolution": 32, "workers": None})
    assert (config.resolution, config.format, config.workers) == (32, "jpg", ShardConfig().workers)


def test_a_flag_overrides_one_field_of_a_nested_section_and_keeps_the_files_others(tmp_path):
    """``--workers`` sets ``train.ray_train.workers``; the file's other Ray Train fields stay,
    an unset flag changes nothing, and a refused value is blamed on its flag."""
    import typer

    from ldmflow.flows.cli_options import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 3\n  ray_train:\n    workers: 4\n    checkpoint_every: 7\n")
    config = configs.load(DiffusionConfig, str(path), section="train", overrides={"ray_train": {"workers": 1}})
    assert (config.steps, config.ray_train.workers, config.ray_train.checkpoint_every) == (3, 1, 7)
    kept = configs.load(DiffusionConfig, str(path), section="train", overrides={"ray_train": {"workers": None}})
    assert kept.ray_train.workers == 4
    with pytest.raises(typer.BadParameter) as refused:
        load_config(DiffusionConfig, str(path), "train", {"steps": None, "ray_train": {"workers": -1}})
    assert refused.value.param_hint == "--workers" and "ray_train.workers" in str(refused.value)
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  workers: 4\n")
    with pytest.raises(configs.ConfigError, match="train.workers: unknown field"):
        configs.load(DiffusionConfig, str(old), section="train")


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
        ("shard:\n  resolutoin: 3\n", "shard.resolutoin: unknown field"),
        ("shard:\n  resolution: big\n", "shard.resolution: Input should be a valid integer"),
        ("shard:\n  format: gif\n", "shard.format: Input should be 'png' or 'jpg'"),
        ("shard:\n  resolution: 0\n", "shard.resolution: Input should be greater than or equal to 1"),
        ("shard:\n  jpeg_quality: 101\n", "shard.jpeg_quality: Input should be less than or equal to 100"),
        ("shard: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(configs.ConfigError, match=message.replace("(", r"\(")):
        configs.load(ShardConfig, str(path), section="shard")


def test_a_misspelt_section_is_an_error_not_defaults(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("shrad:\n  resolution: 64\ntrain:\n  steps: 3\n")
    for cls, section in ((ShardConfig, "shard"), (DiffusionConfig, "train")):
        with pytest.raises(configs.ConfigError, match="unknown section.s. shrad: the sections are shard, "):
            configs.load(cls, str(path), section=section)


def test_the_sections_are_the_stages_and_pipeline():
    from ldmflow.flows.settings import stage_sections

    assert configs.SECTIONS == (*stage_sections(), "pipeline")


def test_nested_errors_carry_the_whole_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  noise:\n    schedule: quadratic\n    beta_end: -1\n  cond_dropout: 1.0\n")
    with pytest.raises(configs.ConfigError) as raised:
        load_spec(str(path))
    message = str(raised.value)
    assert "train.noise.schedule: Input should be" in message
    assert "train.noise.beta_end: Input should be greater than 0" in message
    assert "train.cond_dropout: Input should be less than 1" in message


def test_configs_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ShardConfig(workers=0)
    with pytest.raises(ValueError, match="unknown stage"):
        PipelineConfig(stages=("shard", "publish"))


def test_round_trip_through_json():
    config = DiffusionConfig(steps=7, noise={"schedule": "cosine"})
    assert configs.from_dict(DiffusionConfig, json.loads(json.dumps(configs.to_dict(config)))) == config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_every_section_as_written(path):
    """Each file through the command line's loader: every key of every section is taken as
    written (none dropped, none defaulted), and absent keys keep their defaults."""
    written = yaml.safe_load(path.read_text())
    spec = load_spec(str(path))
    assert set(written) <= {field.name for field in dataclasses.fields(spec)}, sorted(written)
    for section, values in written.items():
        loaded = configs.to_dict(getattr(spec, section))

        def check(expected: dict, actual: dict, where: str) -> None:
            for key, value in expected.items():
                if isinstance(value, dict):
                    check(value, actual[key], f"{where}{key}.")
                else:
                    assert actual[key] == value, f"{path.name}: {where}{key} loaded as {actual[key]!r}, written {value!r}"

        check(values, loaded, f"{section}.")
    assert spec.shard.resolution == written["shard"]["resolution"]


def test_identity_leaves_out_execution_fields_and_keys_follow_it():
    base = DiffusionConfig()
    executed = dataclasses.replace(base, experiment="elsewhere", ray_train=dataclasses.replace(
        base.ray_train, log_every=1, checkpoint_every=7, max_failures=0, workers=5, loader_workers=3))
    assert configs.identity(executed) == configs.identity(base)
    assert configs.key(executed, latents="x") == configs.key(base, latents="x")
    assert configs.run_name("diffusion", executed, latents="x") == configs.run_name("diffusion", base, latents="x")
    assert "log_every" not in configs.identity(base)["ray_train"] and "steps" in configs.identity(base)
    assert configs.identity(base)["ray_train"]["shuffle_buffer"] == base.ray_train.shuffle_buffer  # nested identity
    reshuffled = dataclasses.replace(base, ray_train=dataclasses.replace(base.ray_train, shuffle_buffer=7))
    assert configs.key(reshuffled, latents="x") != configs.key(base, latents="x")
    changed = dataclasses.replace(base, steps=base.steps + 1)
    assert configs.key(changed, latents="x") != configs.key(base, latents="x")
    assert configs.key(base, latents="x") != configs.key(base, latents="y")
    noise = dataclasses.replace(base, noise=dataclasses.replace(base.noise, schedule="cosine"))
    assert configs.key(noise) != configs.key(base)
