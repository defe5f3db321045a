"""Cluster mode on one machine: ``infra/local/stack up`` starts a Ray head and two worker
nodes, moto's S3 server, an MLflow tracking server (artifacts on that S3) and a Prefect
server with a process worker per work pool, each its own process. On it:

- the shipped ``configs/local-cluster.yaml`` pipeline runs unchanged as the ``on-demand``
  Prefect deployment, picked up by the stack's worker, with shards, latents, stage records
  and checkpoints on S3, Train workers and precompute actors on both worker nodes, and the
  model promoted on the tracking server, its files on S3;
- ``ldmflow pipeline`` with the same config from a driver shell finds all of it done;
- node loss, by SIGKILL of a node's raylet: during diffusion training (the run resumes from
  its recorded checkpoint on a replacement node and registers once), during serving (at
  most the requests in flight fail; Serve heals by itself) and during precompute (the
  manifest equals the unbroken run's);
- with the driver's folder deleted, ``ldmflow serve models:/NAME@production`` from another
  folder deploys two replicas on the two worker nodes and answers HTTP;
- ``stack down`` leaves none of the stack's processes (also when a test above failed).

One stack for the module; the driver processes are CLI subprocesses with the variables
``stack up`` printed, as a user's shell would have them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "infra" / "local" / "stack"
CONFIG = ROOT / "configs" / "local-cluster.yaml"
CLI = [sys.executable, "-m", "ldmflow.flows.cli"]
PREFECT = str(Path(sys.executable).parent / "prefect")
MODEL = "local-digits"
REPLICA = "ServeReplica:ldmflow:SamplerServer"

pytestmark = pytest.mark.cluster


@dataclass
class LocalStack:
    home: Path
    env: dict[str, str]
    groups: set[int] = field(default_factory=set)  # the process groups `up` started

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(STACK), *args, "--home", str(self.home)], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def stack_pids(self) -> list[int]:
        """Every process still in a process group the stack started."""
        groups = {int(p.read_text().split()[0]) for p in (self.home / "pids").glob("*.pid")} | self.groups
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) in groups and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def stack():
    # Ray's unix sockets live under the stack's folder: keep its path short.
    home = Path(tempfile.mkdtemp(prefix="lst-", dir="/tmp"))
    s3, mlflow, prefect, ray, client, dashboard = _free_ports(6)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    base_env["LDMFLOW_PYTHON"] = sys.executable
    local = LocalStack(home, base_env)
    up = local.run("up", "--s3-port", str(s3), "--mlflow-port", str(mlflow), "--prefect-port", str(prefect),
                   "--ray-port", str(ray), "--ray-client-port", str(client), "--dashboard-port", str(dashboard))
    try:
        assert up.returncode == 0, up.stdout + up.stderr[-4000:]
        exports = dict(line[len("export "):].split("=", 1) for line in up.stdout.splitlines() if line.startswith("export "))
        assert set(exports) >= {"AWS_ENDPOINT_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"}
        local.env = {**base_env, **exports}
        local.groups = {int(p.read_text().split()[0]) for p in (home / "pids").glob("*.pid")}
        again = local.run("up")  # idempotent: nothing new is started
        assert again.returncode == 0 and {int(p.read_text().split()[0]) for p in (home / "pids").glob("*.pid")} \
            == local.groups, again.stderr[-2000:]
        yield local
    finally:
        if (home / "pids").exists():  # nodes added since `up` count too
            local.groups |= {int(p.read_text().split()[0]) for p in (home / "pids").glob("*.pid")}
        local.run("down", timeout=180)
        leftover = local.stack_pids() if local.groups else []
        for pid in leftover:  # never leave a process behind, even when the check below fails
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
        assert not leftover, f"stack down left processes {leftover}"


def _ray_probe(env: dict[str, str], class_name: str, state: str = "", task: bool = False) -> dict:
    """The head's node id, the node of every actor of ``class_name`` (alive or dead, or only
    those in ``state``; with ``task``, of every task of that name), and each alive node's
    raylet socket."""
    filters = [("name" if task else "class_name", "=", class_name)] + ([("state", "=", state)] if state else [])
    code = f"""
import json, ray
from ray.util.state import list_actors, list_tasks
ray.init(logging_level="ERROR", log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
actors = {"list_tasks" if task else "list_actors"}(filters={filters!r}, limit=1000, raise_on_missing_output=False)
print("PROBE=" + json.dumps({{"head": [n["NodeID"] for n in alive if not n["Resources"].get("CPU")],
                            "sockets": {{n["NodeID"]: n["RayletSocketName"] for n in alive}},
                            "nodes": [a.node_id for a in actors]}}))
"""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    answers = [line for line in result.stdout.splitlines() if line.startswith("PROBE=")]
    assert result.returncode == 0 and answers, result.stderr[-3000:]
    return json.loads(answers[-1][len("PROBE="):])


def _raylet_with_socket(socket_name: str) -> int:
    """The raylet process started with ``--raylet_socket_name=SOCKET`` (one per node)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"/raylet") and f"--raylet_socket_name={socket_name}".encode() in args:
            return int(cmdline.parent.name)
    raise AssertionError(f"no raylet with socket {socket_name}")


def _s3(env: dict[str, str]):
    """A boto3 client of the stack's S3 server."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env.get("AWS_DEFAULT_REGION"))


def _s3_keys(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in _s3(env).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


@dataclass
class NodeLoss:
    killed_at: float  # time.time() of the SIGKILL
    raylet: int
    replacement: str  # the node `stack add-node` started


def _raylet_of(stack: LocalStack, node: str) -> int:
    """The raylet process of one of the stack's Ray nodes."""
    group = int((stack.home / "pids" / f"{node}.pid").read_text().split()[0])
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        if name == "raylet" and int(fields[2]) == group:
            return int(stat.parent.name)
    raise AssertionError(f"no raylet in {node}'s process group")


def _diffusion_checkpoint_recorded(env: dict[str, str]) -> bool:
    """Ray Train has recorded a diffusion checkpoint (its snapshot is written after the upload)."""
    return any(key.startswith("checkpoints/diffusion-") and key.endswith("/checkpoint_manager_snapshot.json")
               for key in _s3_keys(env, "ldmflow-data", "checkpoints/"))


@pytest.fixture(scope="module")
def pipeline_run(stack, tmp_path_factory):
    """The shipped cluster config's whole pipeline as the `on-demand` deployment of
    prefect.yaml: `ldmflow deploy`, then a run of it that the stack's GPU-pool worker picks
    up and runs from its own folder. Once diffusion training has recorded a checkpoint, a
    worker node's raylet is SIGKILLed and a replacement node is started, as an autoscaler or
    KubeRay would."""
    caller = tmp_path_factory.mktemp("caller")
    env = {**stack.env, "LDMFLOW_HOME": str(caller / "state")}
    deploy = subprocess.run([*CLI, "deploy", "--name", "on-demand"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=180)
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    worker_log = stack.home / "logs" / "prefect-worker-ldmflow-gpu.log"
    params = json.dumps({"config": str(CONFIG)})
    with open(caller / "run.log", "w") as out:
        run = subprocess.Popen([PREFECT, "deployment", "run", "pipeline/on-demand", "--params", params, "--watch",
                                "--watch-timeout", "600"], env=env, cwd=caller, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and run.poll() is None and not _diffusion_checkpoint_recorded(env):
                time.sleep(0.5)
            assert run.poll() is None, (caller / "run.log").read_text()[-2000:] + worker_log.read_text()[-4000:]
            raylet = _raylet_of(stack, "ray-worker-2")
            os.kill(raylet, signal.SIGKILL)
            loss = NodeLoss(time.time(), raylet, "")
            added = stack.run("add-node")
            assert added.returncode == 0, added.stderr[-3000:]
            loss.replacement = added.stdout.strip()
            run.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    # The worker streams the flow run's output into its log.
    assert run.returncode == 0, (caller / "run.log").read_text()[-2000:] + worker_log.read_text()[-6000:]
    return loss


@pytest.fixture(scope="module")
def driver_run(stack, pipeline_run, tmp_path_factory):
    """The same config through the CLI from a user's shell with the stack's variables, in a
    driver folder of its own: every stage finds its record on the cluster's S3."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("local-cluster").experiment_id
    runs_before = len(client.search_runs([experiment]))
    driver = tmp_path_factory.mktemp("driver")
    env = {**stack.env, "LDMFLOW_HOME": str(driver / "state")}
    result = subprocess.run([*CLI, "pipeline", "--config", str(CONFIG), "--no-progress"], env=env, cwd=driver,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return driver, result.stdout + result.stderr, len(client.search_runs([experiment])) - runs_before


def test_the_shipped_config_runs_unchanged_as_a_deployment_on_the_cluster(stack, pipeline_run):
    from mlflow.tracking import MlflowClient

    # Every output on S3: shards, latents, stage records, checkpoints.
    data = _s3_keys(stack.env, "ldmflow-data")
    for prefix in ("datasets/local-digits/images-", "datasets/local-digits/latents-", "datasets/local-digits/_stages/",
                   "checkpoints/"):
        assert any(key.startswith(prefix) for key in data), prefix
    # Nothing a later run reads names the local folders of the machine the flow ran on.
    for key in (k for k in data if k.startswith("datasets/local-digits/_stages/")):
        assert str(stack.home) not in _read(stack.env, "ldmflow-data", key), key

    # The model at production on the tracking server, its files in the artifact bucket.
    client = MlflowClient(tracking_uri=stack.env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias(MODEL, "production")
    assert version.source.startswith("mlflow-artifacts:/")
    artifacts = _s3_keys(stack.env, "ldmflow-mlflow", "artifacts/")
    assert any(key.endswith("unet/diffusion_pytorch_model.safetensors") for key in artifacts)
    assert not any(str(stack.home) in value for value in version.tags.values())

    # Work spread over the worker nodes, none on the head (it has no CPUs): the shard flow's
    # chunks (Ray tasks through prefect-ray), training workers, encoder actors.
    for class_name, task in (("write-shard", True), ("RayTrainWorker", False), ("MapWorker(Map(LatentEncoder))", False)):
        placed = _ray_probe(stack.env, class_name, task=task)
        assert len(set(placed["nodes"])) >= 2 and not set(placed["nodes"]) & set(placed["head"]), (class_name, placed)


def test_the_cli_on_a_driver_shell_finds_the_deployments_work(stack, pipeline_run, driver_run):
    """`ldmflow pipeline` with the stack's variables is the same pipeline: it reads the
    deployment run's records from S3 and the tracking server, runs nothing again, and ends
    at the production model."""
    _, output, new_runs = driver_run
    assert f"models:/{MODEL}@production" in output, output[-3000:]
    assert new_runs == 0, output[-3000:]  # no stage ran again


def test_training_survives_the_loss_of_a_worker_node(stack, pipeline_run):
    """The node's Train worker died with its raylet; Ray Train restarted the group (on the
    surviving node and the replacement) from the last recorded checkpoint, and the run
    finished with the configured number of steps, registered once."""
    from mlflow.tracking import MlflowClient

    import yaml

    loss = pipeline_run
    steps = yaml.safe_load(CONFIG.read_text())["train"]["steps"]
    client = MlflowClient(tracking_uri=stack.env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("local-cluster").experiment_id],
                              "tags.`ldmflow.stage` = 'diffusion'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    resumed = client.get_metric_history(run_id, "resumed_from_step")
    assert resumed and all(0 < m.value < steps for m in resumed), resumed
    losses = client.get_metric_history(run_id, "loss")
    assert max(m.step for m in losses) == steps
    assert [v.version for v in client.search_model_versions(f"name = '{MODEL}'")] == ["1"]  # registered once
    # What it cost (docs/operations.md): the steps trained again, at most one checkpoint
    # interval (the run went back to its newest recorded checkpoint, not to an older one or
    # the start), and the time from the kill to training again.
    every = yaml.safe_load(CONFIG.read_text())["train"]["ray_train"]["checkpoint_every"]
    first = min(resumed, key=lambda m: m.timestamp)
    before = [m.step for m in losses if m.timestamp < first.timestamp]
    redone = max(0, max(before, default=0) - int(first.value))
    print(f"node loss: {redone} steps trained again; training resumed "
          f"{first.timestamp / 1000 - loss.killed_at:.1f} s after the raylet was killed")
    assert first.value % every == 0 and redone <= every, (first.value, before)
    placed = _ray_probe(stack.env, "RayTrainWorker")
    assert len(set(placed["nodes"])) == 3, placed  # both first nodes, then the replacement


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status == 200
    except Exception:
        return False


def _read(env: dict[str, str], bucket: str, key: str) -> str:
    return _s3(env).get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def test_precompute_survives_the_loss_of_a_worker_node(stack, pipeline_run, tmp_path):
    """The pipeline's latents are the unbroken run. The same precompute again, to another
    prefix: the raylet of a node whose actor is encoding a shard is SIGKILLed and a
    replacement node added; the lost shard is encoded again by a new actor, each shard is
    written under its one name, and the manifest equals the unbroken run's."""
    keys = _s3_keys(stack.env, "ldmflow-data", "datasets/local-digits/")
    unbroken = next(k for k in keys if k.startswith("datasets/local-digits/latents-") and k.endswith("/manifest.json"))
    expected = json.loads(_read(stack.env, "ldmflow-data", unbroken))
    dest = "s3://ldmflow-data/node-loss/latents"
    command = [*CLI, "precompute", expected["image_dataset"], dest, "--autoencoder", expected["autoencoder"]["uri"],
               "--config", str(CONFIG), "--no-progress"]
    env = {**stack.env, "LDMFLOW_HOME": str(tmp_path / "state")}
    with open(tmp_path / "precompute.log", "w") as out:
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and process.poll() is None and (encoder := helpers.encoder_at_work()) is None:
                time.sleep(0.02)
            assert process.poll() is None, (tmp_path / "precompute.log").read_text()[-4000:]
            raylet = int(Path(f"/proc/{encoder}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
            os.kill(raylet, signal.SIGKILL)
            replacement = stack.run("add-node")
            assert replacement.returncode == 0, replacement.stderr[-3000:]
            process.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    output = (tmp_path / "precompute.log").read_text()
    assert process.returncode == 0, output[-4000:]
    assert "View run" not in output  # MLflow prints each run's URL on a tracking server unless told not to

    got = json.loads(_read(stack.env, "ldmflow-data", "node-loss/latents/manifest.json"))
    assert got == expected and not got["failed_shards"]
    # One latent shard and one part record per image shard, and nothing else (no second copy,
    # no half-written object).
    written = [k[len("node-loss/latents/"):] for k in _s3_keys(stack.env, "ldmflow-data", "node-loss/latents/")]
    shards = sorted(k for k in written if k.endswith(".tar"))
    parts = [k for k in written if k.startswith("_parts/") and k.endswith(".json")]
    assert shards == sorted(s["url"] for s in expected["shards"])
    assert len(parts) == len(shards) and len(written) == 2 * len(shards) + 1, written


def _assert_scraped_through_rays_discovery_file(ray_temp: Path) -> None:
    """What infra/prometheus/prometheus.yml's ``ray`` job does: read the targets Ray lists in
    its temp folder and scrape them; the request just served and the version are there."""
    discovery, deadline, samples = ray_temp / "prom_metrics_service_discovery.json", time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        if discovery.exists():
            targets = [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
            samples = helpers.scrape(targets)
            if samples.get(("ray_ldmflow_requests_total", (("route", "/v1/generate"), ("status", "200")))):
                break
        time.sleep(2)
    assert samples.get(("ray_ldmflow_requests_total", (("route", "/v1/generate"), ("status", "200")))) == 1, samples
    assert samples.get(("ray_ldmflow_images_total", (("mode", "generate"),))) == 2, samples
    assert samples.get(("ray_ldmflow_model_version", (("model", MODEL),)), 0) >= 1, samples


def _the_page_compares_on_the_stack(url: str) -> None:
    """The sampler's page against the stack's served model: its versions from the tracking
    server, and (where the system has Chromium) a compare drawn in a real browser."""
    with urllib.request.urlopen(url + "/", timeout=60) as response:
        assert "<title>ldmflow" in response.read().decode()
    with urllib.request.urlopen(url + "/v1/versions", timeout=60) as response:
        listed = json.loads(response.read())
    assert listed["name"] == MODEL and any("production" in v["aliases"] for v in listed["versions"]), listed
    if not helpers.chromium_available():
        return
    from selenium.webdriver.support.ui import Select

    driver = helpers.chromium()
    try:
        driver.get(url + "/")
        helpers.wait_until(lambda: driver.find_elements("css selector", "#versions tbody tr"), 60, "the versions")
        for side in ("left", "right"):
            Select(driver.find_element("id", side)).select_by_value("production")
        driver.find_element("id", "compare").click()
        helpers.wait_until(lambda: len(helpers.page_images(driver, "left-images")) == 4
                           == len(helpers.page_images(driver, "right-images")), 120, "a compare on the stack")
        assert helpers.page_images(driver, "left-images") == helpers.page_images(driver, "right-images")
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()


def test_serve_from_another_folder_after_the_driver_folder_is_gone(stack, driver_run, tmp_path):
    from PIL import Image

    # The strict way: nothing may be read from where the runs started, the deployment's or the CLI's.
    shutil.rmtree(stack.home / "state", ignore_errors=True)
    shutil.rmtree(driver_run[0])
    port = _free_ports(1)[0]
    env = {**stack.env, "LDMFLOW_HOME": str(tmp_path / "state")}
    server = subprocess.Popen([*CLI, "serve", f"models:/{MODEL}@production", "--config", str(CONFIG), "--port",
                               str(port)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    output = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and server.poll() is None:
            line = server.stdout.readline()
            output.append(line)
            if line.startswith("serve:"):
                break
        assert server.poll() is None and output[-1].startswith("serve:"), "".join(output)[-4000:]
        body = json.dumps({"n": 2, "steps": 4, "seed": 1, "label": 3}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        images = [Image.open(io.BytesIO(base64.b64decode(item))) for item in answer["images"]]
        assert len(images) == 2 and images[0].size[0] > 0
        placed = _ray_probe(stack.env, REPLICA, "ALIVE")
        assert len(set(placed["nodes"])) == 2, placed  # one replica on each worker node
        _assert_scraped_through_rays_discovery_file(stack.home / "ray")  # counts the one request above
        _the_page_compares_on_the_stack(f"http://127.0.0.1:{port}")  # after: its requests are counted too

        # Node loss: the raylet of one replica's node is SIGKILLed while two clients keep
        # asking. At most the requests in flight on it fail; Serve replaces the replica on
        # the surviving node (replicas take half a CPU) with nobody acting.
        outcomes, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                started = time.time()
                try:
                    with urllib.request.urlopen(urllib.request.Request(
                            f"http://127.0.0.1:{port}/v1/generate", data=json.dumps({"n": 1, "steps": 4}).encode(),
                            headers={"Content-Type": "application/json"}), timeout=60) as reply:
                        outcomes.append((started, time.time(), reply.status == 200))
                except Exception:
                    outcomes.append((started, time.time(), False))

        clients = [threading.Thread(target=client) for _ in range(2)]
        for thread in clients:
            thread.start()
        try:
            under_way = time.monotonic() + 120
            while sum(ok for _, _, ok in outcomes) < 2 and time.monotonic() < under_way:  # both clients going
                time.sleep(0.1)
            assert sum(ok for _, _, ok in outcomes) >= 2, outcomes  # served before the kill, or the test proves nothing
            killed_at, lost_node = time.time(), placed["nodes"][0]
            os.kill(_raylet_with_socket(placed["sockets"][lost_node]), signal.SIGKILL)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                time.sleep(1)
                replicas = _ray_probe(stack.env, REPLICA, "ALIVE")["nodes"]
                if len(replicas) == 2 and lost_node not in replicas and _healthy(port):
                    break
            healed_after = time.time() - killed_at
            served = len(outcomes)
            while len(outcomes) < served + 4 and time.time() < killed_at + 240:  # requests after the recovery
                time.sleep(0.1)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=90)
        failed = [o for o in outcomes if not o[2]]
        after = [o for o in outcomes if o[0] > killed_at + healed_after]
        print(f"serve node loss: {len(failed)} of {len(outcomes)} requests failed; two replicas again "
              f"{healed_after:.1f} s after the kill")
        assert len(failed) <= len(clients), failed  # only what was in flight
        assert after and all(ok for _, _, ok in after)
        replicas = _ray_probe(stack.env, REPLICA, "ALIVE")["nodes"]
        assert len(replicas) == 2 and lost_node not in replicas, replicas
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
