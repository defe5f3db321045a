"""The ``ldmflow`` command line, run as a user would: a subprocess."""

import subprocess
import sys

import numpy as np
import pytest

from ldmflow.data import image_shards

CLI = [sys.executable, "-m", "ldmflow.flows.cli"]
SUBCOMMANDS = ["shard", "train-autoencoder", "precompute", "train", "inspect", "evaluate", "promote", "rollback", "export",
               "sample", "serve", "pipeline", "deploy"]


def run(args, env, cwd, timeout=300):
    return subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [[], *([c] for c in SUBCOMMANDS)])
def test_help(command, subprocess_env, tmp_path):
    result = run([*command, "--help"], subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    if not command:
        for name in SUBCOMMANDS:
            assert name in result.stdout


def test_shard_then_inspect(subprocess_env, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("shard:\n  resolution: 8\n  shard_size: 40\n")
    result = run(["shard", "builtin:mnist", "out", "--config", str(config), "--limit", "100", "--no-progress"],
                 subprocess_env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100 inputs -> 100 samples in 3 shards" in result.stdout
    manifest = image_shards.read_manifest(str(tmp_path / "out"))
    assert manifest.config["resolution"] == 8 and manifest.config["limit"] == 100

    result = run(["inspect", "out"], subprocess_env, tmp_path)
    assert result.returncode == 0 and "shard-000002.tar" in result.stdout and "classes: 0, 1" in result.stdout


def test_errors_are_one_clear_line(subprocess_env, tmp_path):
    result = run(["shard", str(tmp_path / "missing"), "out", "--no-progress"], subprocess_env, tmp_path)
    assert result.returncode == 1 and "no such folder" in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("shard:\n  shard_sise: 3\n")
    result = run(["shard", "builtin:digits", "out", "--config", str(bad)], subprocess_env, tmp_path)
    assert result.returncode == 2 and "shard_sise" in result.stderr
    result = run(["inspect", "nowhere"], subprocess_env, tmp_path)
    assert result.returncode == 2 and "no manifest" in result.stderr


def test_sample_edit_inpaint_and_export(subprocess_env, tmp_path):
    from PIL import Image

    from tests.helpers import tiny_diffusion_model

    model = tiny_diffusion_model(tmp_path / "model")
    result = run(["sample", str(model), "--label", "3", "--n", "4", "--steps", "3", "--out", "drawn"],
                 subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["000000.png", "000001.png", "000002.png",
                                                                      "000003.png", "grid.png"]
    assert Image.open(tmp_path / "drawn" / "grid.png").size == (64, 16)

    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))
    mask.save(tmp_path / "mask.png")
    result = run(["sample", str(model), "--init-image", "drawn/000000.png", "--mask", "mask.png", "--n", "1",
                  "--steps", "3", "--out", "filled"], subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr
    kept = np.asarray(Image.open(tmp_path / "filled" / "000000.png"))[:, :8]
    assert (kept == np.asarray(Image.open(tmp_path / "drawn" / "000000.png"))[:, :8]).all()

    result = run(["sample", str(model), "--label", "12", "--out", "x"], subprocess_env, tmp_path)
    assert result.returncode == 1 and "label: 12 is not a class" in result.stderr and "Traceback" not in result.stderr

    result = run(["export", str(model), "exported"], subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "exported" / "model_index.json").exists() and (tmp_path / "exported" / "pipeline.py").exists()


def test_evaluate_promote_and_rollback_commands(digits_model, subprocess_env, tmp_path):
    """The registry commands against the session's MLflow (same LDMFLOW_HOME), as a user runs them."""
    from ldmflow.registry import models, tracking

    name = "cli-gate"
    for _ in range(2):
        models.register(digits_model.folder, name, tracking.client().create_run(tracking.experiment_id("cli")).info.run_id)
    config = tmp_path / "eval.yaml"
    config.write_text("evaluate: {num_samples: 20, reference_samples: 60, steps: 4, kid_subset_size: 10, kid_subsets: 3}\n"
                      "promote: {metric: kid, margin: 1.0}\n")

    result = run(["evaluate", f"models:/{name}/1", "--config", str(config)], subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fd " in result.stdout and "domain-classifier features" in result.stdout

    result = run(["promote", name, "--config", str(config)], subprocess_env, tmp_path)  # v2, the first to production
    assert result.returncode == 0 and "promoted version 2" in result.stdout, result.stdout + result.stderr[-2000:]
    result = run(["rollback", name], subprocess_env, tmp_path)
    assert result.returncode == 1 and "nothing to roll back to" in result.stderr and "Traceback" not in result.stderr
    result = run(["promote", name, "--config", str(config)], subprocess_env, tmp_path)
    assert result.returncode == 0 and "already holds it" in result.stdout
    result = run(["promote", "no-such-model"], subprocess_env, tmp_path)
    assert result.returncode == 1 and "no-such-model" in result.stderr
