"""``ldmflow deploy`` against a Prefect server (the session's local one): the deployments of
prefect.yaml are registered with their schedules, triggers and work pools, a deployment run
is picked up by a real process worker and completes, and its completion fires the
promotion deployment's event trigger."""

import subprocess
import sys
import time
from pathlib import Path

from ldmflow.data import image_shards, storage

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def test_deploy_then_a_worker_runs_a_deployment(subprocess_env, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    env = {**subprocess_env, "LDMFLOW_HOME": str(tmp_path / "state")}
    result = subprocess.run([sys.executable, "-m", "ldmflow.flows.cli", "deploy"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("nightly-data", "weekly-training", "promote-after-training", "on-demand"):
        assert f"pipeline/{name}" in result.stdout, result.stdout

    with get_client(sync_client=True) as client:
        weekly = client.read_deployment_by_name("pipeline/weekly-training")
        assert weekly.work_pool_name == "ldmflow-gpu"
        assert [s.schedule.cron for s in weekly.schedules] == ["0 4 * * 0"]
        assert weekly.parameters["stages"] == ["shard", "autoencoder", "precompute", "train"]
        assert client.read_work_pool("ldmflow-cpu").type == "process"

    config = tmp_path / "tiny.yaml"
    dest = tmp_path / "datasets"
    config.write_text(f"shard: {{resolution: 8, shard_size: 50, limit: 100}}\npipeline: {{storage: '{dest}'}}\n")
    # The weekly training deployment, cut down to its first stage: what matters here is that a
    # worker of its pool runs it to completion and that the completion starts the promotion.
    flow_run = run_deployment("pipeline/weekly-training", parameters={"config": str(config), "stages": ["shard"]},
                              timeout=0)
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", "ldmflow-gpu", "--run-once"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr[-3000:]
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 120
        state = client.read_flow_run(flow_run.id).state
        while not state.is_final() and time.monotonic() < deadline:
            time.sleep(1)
            state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), (state, worker.stdout[-3000:], worker.stderr[-3000:])
    images = next(p for p in (dest / "digits").iterdir() if p.name.startswith("images-"))
    assert image_shards.read_manifest(str(images)).num_samples == 100
    assert storage.exists(str(next((dest / "digits" / "_stages").iterdir())))

    promote = _wait_for_runs_of("pipeline/promote-after-training", timeout=60)
    assert promote, "the completed weekly-training run did not trigger promote-after-training"
    # Its stages are the deployment's; its config is the training run's, not the default.
    assert promote[0].parameters == {"config": str(config), "stages": ["evaluate", "promote"]}


def _wait_for_runs_of(deployment: str, timeout: float) -> list:
    """The flow runs of ``deployment``, once there is at least one (or none after ``timeout``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        deadline = time.monotonic() + timeout
        while not (runs := client.read_flow_runs(deployment_filter=only)) and time.monotonic() < deadline:
            time.sleep(1)
    return runs
