"""The ``ldmflow`` command line, run as a user would: a subprocess."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ldmflow.data import image_shards

CLI = [sys.executable, "-m", "ldmflow.flows.cli"]
ROOT = Path(__file__).resolve().parents[1]
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


def test_commands_share_one_local_prefect_api_that_stops_when_idle(subprocess_env, tmp_path):
    """With no PREFECT_API_URL, the first command starts Prefect's local API in the
    background and the next one uses it; it stops once nobody has used it for a while."""
    state = tmp_path / "state"
    env = {key: value for key, value in subprocess_env.items() if key != "PREFECT_API_URL"}
    env.update(LDMFLOW_HOME=str(state), PREFECT_HOME=str(state / "prefect"), LDMFLOW_LOCAL_API_IDLE_SECONDS="10")
    servers = []
    try:
        for out in ("one", "two"):
            result = run(["shard", "builtin:digits", out, "--resolution", "8", "--limit", "20", "--no-progress"],
                         env, tmp_path)
            assert result.returncode == 0, result.stdout + result.stderr
            servers.append(json.loads((state / "prefect" / "local-api.json").read_text()))
        assert servers[0] == servers[1] and servers[0]["url"].startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 120
        while running(servers[0]["pid"]) and time.monotonic() < deadline:
            time.sleep(1)
        assert not running(servers[0]["pid"]), "the idle local API did not stop"
    finally:
        for server in servers[:1]:
            if running(server["pid"]):
                os.kill(server["pid"], signal.SIGKILL)


def running(pid: int) -> bool:
    """Whether the process exists and has not exited (an unreaped child is a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def test_errors_are_one_clear_line(subprocess_env, tmp_path):
    result = run(["shard", str(tmp_path / "missing"), "out", "--no-progress"], subprocess_env, tmp_path)
    assert result.returncode == 1 and "no such folder" in result.stderr and "Traceback" not in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("shard:\n  shard_sise: 3\n")
    result = run(["shard", "builtin:digits", "out", "--config", str(bad)], subprocess_env, tmp_path)
    assert result.returncode == 2 and "shard_sise" in result.stderr
    result = run(["inspect", "nowhere"], subprocess_env, tmp_path)
    assert result.returncode == 2 and "no manifest" in result.stderr


def test_every_expected_failure_is_one_line(subprocess_env, tmp_path):
    """A user's first wrong turns: each answers in one `error:` line that says what is wrong,
    with a non-zero exit and no traceback, wherever it was raised (here: inside Prefect
    tasks and flows, the registry, the deployment client)."""
    unusable = tmp_path / "unusable"
    unusable.mkdir()
    (unusable / "a.png").write_bytes(b"not an image")
    (unusable / "b.jpg").write_bytes(b"")
    typo = tmp_path / "typo.yaml"
    typo.write_text("shrad:\n  resolution: 16\n")
    no_server = {k: v for k, v in subprocess_env.items() if k != "PREFECT_API_URL"}
    no_server["PREFECT_HOME"] = str(tmp_path / "prefect")  # no profile naming a server either
    cases = [
        (["train", "nowhere"], subprocess_env, 1, "nowhere/manifest.json: no manifest"),
        (["evaluate", "models:/nope/3"], subprocess_env, 1, "models:/nope/3: not in the model registry"),
        (["rollback", "nope"], subprocess_env, 1, "nope: no registered model of that name"),
        # Usage errors, with no Prefect API anywhere: answered before one is started.
        (["shard", "builtin:digits", "out", "--config", "missing.yaml"], no_server, 2, "missing.yaml: cannot read it"),
        (["shard", "builtin:digits", "out", "--resolution", "0"], no_server, 2,
         "Invalid value for --resolution: resolution: Input should be greater than or equal to 1"),
        (["shard", "builtin:digits", "out", "--config", str(typo)], no_server, 2, "unknown section(s) shrad"),
        (["train", "latents", "--steps", "0"], no_server, 2, "Invalid value for --steps"),
        (["pipeline", "--stage", "sharding"], no_server, 2, "unknown stage(s) sharding"),
        (["shard", "unusable", "out", "--no-progress"], subprocess_env, 1,
         "no usable image among 2 inputs (1 not an image, 1 empty file)"),
        (["deploy", "--file", str(ROOT / "prefect.yaml")], no_server, 1, "no Prefect server"),
        (["serve", "models:/anything@production", "--host", "0.0.0.0"], subprocess_env, 2,
         "serve.host 0.0.0.0 without API keys"),
    ]
    for args, env, code, message in cases:
        result = run(args, env, tmp_path)
        assert result.returncode == code, (args, result.stderr[-3000:])
        assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: "), \
            (args, result.stderr[-3000:])
        assert message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "prefect" / "local-api.json").exists()  # no local API was started for them
    # The report of the unusable folder is written all the same.
    assert len(image_shards.read_jsonl(str(tmp_path / "out" / image_shards.REJECTS))) == 2


def test_sample_edit_inpaint_and_export(subprocess_env, tmp_path):
    from PIL import Image

    from ldmflow.model.inpainting import FEATHER_PIXELS

    from tests.helpers import tiny_diffusion_model

    model = tiny_diffusion_model(tmp_path / "model")
    result = run(["sample", str(model), "--label", "3", "--n", "4", "--steps", "3", "--out", "drawn"],
                 subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["000000.png", "000001.png", "000002.png",
                                                                      "000003.png", "grid.png"]
    assert Image.open(tmp_path / "drawn" / "grid.png").size == (64, 16)
    progress = result.stderr.splitlines()  # not a terminal: a first and a last plain line
    assert progress[0] == "sample: 0/3 steps" and progress[-1].startswith("sample: 3/3 steps  "), result.stderr

    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))
    mask.save(tmp_path / "mask.png")
    result = run(["sample", str(model), "--init-image", "drawn/000000.png", "--mask", "mask.png", "--n", "1",
                  "--steps", "3", "--out", "filled"], subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr
    exact = 8 - FEATHER_PIXELS  # the known pixels outside the feathered band at the mask's edge
    kept = np.asarray(Image.open(tmp_path / "filled" / "000000.png"))[:, :exact]
    assert (kept == np.asarray(Image.open(tmp_path / "drawn" / "000000.png"))[:, :exact]).all()

    result = run(["sample", str(model), "--label", "12", "--out", "x"], subprocess_env, tmp_path)
    # A refused request is a usage error (2), worded as the HTTP API words it.
    assert result.returncode == 2 and "error: label: 12 is not a class" in result.stderr and "Traceback" not in result.stderr

    result = run(["sample", str(model), "--label", "3", "--steps", "3", "--out", "quiet", "--no-progress"],
                 subprocess_env, tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr

    result = run(["export", str(model), "exported"], subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "exported" / "model_index.json").exists() and (tmp_path / "exported" / "pipeline.py").exists()


def test_sample_interpolates_and_edits_by_inversion(subprocess_env, tmp_path):
    from PIL import Image

    from tests.helpers import tiny_diffusion_model

    model = tiny_diffusion_model(tmp_path / "model")
    common = ["--label", "3", "--steps", "3", "--no-progress"]
    for seed in (1, 2):
        result = run(["sample", str(model), "--seed", str(seed), "--n", "1", *common, "--out", f"seed{seed}"],
                     subprocess_env, tmp_path)
        assert result.returncode == 0, result.stderr
    result = run(["sample", str(model), "--seed", "1", "--interpolate-to", "2", "--n", "4", *common, "--out", "path"],
                 subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "path").iterdir()) == [
        "grid.png", "path-000.png", "path-001.png", "path-002.png", "path-003.png"]

    def pixels(path: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / path))

    # The path's ends are the two seeds' own images, drawn alone.
    assert (pixels("path/path-000.png") == pixels("seed1/000001.png")).all()
    assert (pixels("path/path-003.png") == pixels("seed2/000002.png")).all()
    assert not (pixels("path/path-001.png") == pixels("path/path-000.png")).all()

    result = run(["sample", str(model), "--init-image", "seed1/000001.png", "--invert", "--source-label", "3",
                  "--label", "5", "--steps", "3", "--no-progress", "--out", "inverted"], subprocess_env, tmp_path)
    assert result.returncode == 0, result.stderr
    # The edit is the inversion's: the same job in this process draws the same picture, and
    # neither a plain sample nor an SDEdit of the image (--invert ignored) does.
    from ldmflow.data import images
    from ldmflow.model.grids import to_pil
    from ldmflow.model.sampler import Sampler

    sampler = Sampler.from_folder(model)
    source = images.image_to_model(Image.open(tmp_path / "seed1/000001.png"), sampler.info.resolution)

    def drawn(**fields) -> np.ndarray:
        job = sampler.job(n=1, label=5, steps=3, seed=0, **fields)
        return np.asarray(to_pil(sampler.run([job])[0])[0]).astype(int)

    got = pixels("inverted/000000.png").astype(int)
    assert np.abs(got - drawn(image=source, strength=1.0, invert=True, source_label=3)).max() <= 1
    for other in (drawn(), drawn(image=source, strength=1.0)):
        assert np.abs(got - other).mean() > 2
    result = run(["sample", str(model), "--invert", "--label", "5", "--out", "x"], subprocess_env, tmp_path)
    assert result.returncode == 2 and "error: mode: invert needs an image" in result.stderr


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
    assert f"evaluate models:/{name}/1: 20/20 images  " in result.stderr, result.stderr[-2000:]

    result = run(["promote", name, "--config", str(config)], subprocess_env, tmp_path)  # v2, the first to production
    assert result.returncode == 0 and "promoted version 2" in result.stdout, result.stdout + result.stderr[-2000:]
    result = run(["rollback", name], subprocess_env, tmp_path)
    assert result.returncode == 1 and "nothing to roll back to" in result.stderr and "Traceback" not in result.stderr
    result = run(["promote", name, "--config", str(config)], subprocess_env, tmp_path)
    assert result.returncode == 0 and "already holds it" in result.stdout
    result = run(["promote", "no-such-model"], subprocess_env, tmp_path)
    assert result.returncode == 1 and "no-such-model" in result.stderr


def test_the_failure_behind_rays_and_prefects_wrappers_is_found():
    """What a Ray Train worker raised reaches the driver wrapped twice; a bug raised while an
    expected failure was being handled stays a bug."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from ldmflow.data import storage
    from ldmflow.flows.cli_options import expected_cause

    missing = image_shards.ManifestError("shards/manifest.json: no manifest")
    wrapped = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(missing, "Traceback …")})
    assert expected_cause(wrapped) is missing
    try:
        try:
            raise storage.NotFound("a/b: no such file")
        except storage.NotFound as exc:
            raise image_shards.ManifestError("a: no manifest") from exc
    except image_shards.ManifestError as exc:
        assert str(expected_cause(exc)) == "a: no manifest"  # the outermost says the most
    try:
        try:
            raise storage.NotFound("a/b: no such file")
        except storage.NotFound:
            {}["oops"]
    except KeyError as exc:
        assert expected_cause(exc) is None
