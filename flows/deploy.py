"""``ldmflow deploy``: register the deployments of ``prefect.yaml`` with a Prefect server.

The file is Prefect's own format (``prefect deploy --all`` reads it as well); this reads the
parts ldmflow uses: entrypoint, parameters, cron schedules, event triggers, work pool, tags.
The flow code is this project folder (a local source: workers run from a checkout or from
the container image, which has the same layout), so nothing is built or pushed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ldmflow.errors import LdmflowError

PROJECT = Path(__file__).resolve().parents[1]


class DeployError(LdmflowError, RuntimeError):
    """A deployments file that cannot be read, or a server that refuses a deployment."""


def ensure_work_pool(name: str, pool_type: str = "process") -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))


def check_server() -> str:
    """The Prefect server deployments go to (PREFECT_API_URL, or the profile's), refusing
    none or one that does not answer: without a server, Prefect would register them in a
    throwaway local database that no worker ever reads."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError("no Prefect server: start one (`prefect server start`, or `infra/local/stack up`) and "
                          "set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise DeployError(f"the Prefect server at {url} does not answer ({failure}): is it running?")
    return url


def deploy(file: str = "prefect.yaml", names: list[str] | None = None) -> list[str]:
    """Register every deployment of ``file`` (or those in ``names``) with the Prefect server;
    returns one line each."""
    from prefect import Flow
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    path = Path(file) if Path(file).is_absolute() else Path.cwd() / file
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DeployError(f"{file}: {exc}") from exc
    deployments = spec.get("deployments") or []
    wanted = [d for d in deployments if not names or d.get("name") in names]
    missing = sorted(set(names or ()) - {d.get("name") for d in deployments})
    if missing or not wanted:
        raise DeployError(f"{file}: no deployment named {', '.join(missing) or 'anything'}")
    check_server()
    lines = []
    for entry in wanted:
        pool = entry["work_pool"]["name"]
        ensure_work_pool(pool)
        flow = Flow.from_source(source=str(path.parent), entrypoint=entry["entrypoint"])
        schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in entry.get("schedules") or []]
        triggers = [DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"})
                    for t in entry.get("triggers") or []]
        try:
            deployment_id = flow.deploy(
                name=entry["name"], work_pool_name=pool, build=False, push=False, schedules=schedules or None,
                triggers=triggers or None, parameters=entry.get("parameters") or {},
                description=entry.get("description"), tags=entry.get("tags"), print_next_steps=False)
        except Exception as exc:  # the server's answer, as one line
            raise DeployError(f"{entry['name']}: {exc}") from exc
        when = ", ".join(s["cron"] for s in entry.get("schedules") or []) or ("on events" if triggers else "on demand")
        lines.append(f"{flow.name}/{entry['name']} ({deployment_id}) on pool {pool}, {when}")
    return lines
