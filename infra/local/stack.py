"""A cluster on one machine: every service of ldmflow's cluster mode as its own local process.

    infra/local/stack up [--workers N]   start what is not running, wait until it answers,
                                         print the `export` lines (eval "$(infra/local/stack up)")
    infra/local/stack status             what runs, and whether it answers
    infra/local/stack down               stop exactly what `up` started (by its pid files)
    infra/local/stack add-node           one more Ray worker node, as an autoscaler would add

The services, each bound to 127.0.0.1 and mapped to its production counterpart:

    s3              moto's S3 server, with the buckets configs/local-cluster.yaml names  (MinIO, S3)
    mlflow          `mlflow server`: SQLite, artifacts proxied into s3://ldmflow-mlflow  (MLflow + PostgreSQL)
    prefect         `prefect server start`                                               (Prefect server)
    prefect-worker-POOL   a process worker for each work pool prefect.yaml names         (a Kubernetes work pool)
    ray-head        `ray start --head`, no CPUs of its own: tasks go to the workers      (KubeRay head)
    ray-worker-K    `ray start --address`, each with its own CPUs                        (KubeRay worker group)

Everything (pid files, logs, the SQLite databases, Ray's session folder, the local state of
the flow runs the Prefect workers start, stack.json with the ports) lives under one folder,
`--home` (default `.ldmflow/stack` in the checkout). Each process is started in its own
session; `down` signals each recorded process group, SIGTERM then SIGKILL, and only when the
recorded pid still has the start time it had: a pid the system has since given to another
program is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
MLFLOW_BUCKET = "ldmflow-mlflow"
# moto accepts any key; used only when the caller has none (a real S3 needs real ones).
LOCAL_KEY, LOCAL_SECRET = "ldmflow-local", "ldmflow-local-secret"
UNIX_SOCKET_LIMIT = 107  # Ray's sockets live under its temp folder; longer paths fail to bind


@dataclass
class Ports:
    s3: int = 9000
    mlflow: int = 5000
    prefect: int = 4200
    ray: int = 6379
    ray_client: int = 10001
    dashboard: int = 8265


@dataclass
class Layout:
    """What `up` decided, kept in stack.json so that status, down and add-node agree with it."""

    ports: Ports = field(default_factory=Ports)
    workers: int = 2
    worker_cpus: int = 1
    buckets: list[str] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)


class Stack:
    def __init__(self, home: Path) -> None:
        self.home = home.resolve()
        self.pids, self.logs = self.home / "pids", self.home / "logs"

    # -- layout and environment -------------------------------------------------------------

    def load(self) -> Layout | None:
        path = self.home / "stack.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return Layout(**{**raw, "ports": Ports(**raw["ports"])})

    def save(self, layout: Layout) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "stack.json").write_text(json.dumps(asdict(layout), indent=2))

    def exports(self, layout: Layout) -> dict[str, str]:
        """The variables a client needs: the four endpoints, and what reaching them takes."""
        p = layout.ports
        values = {
            "AWS_ENDPOINT_URL": f"http://{HOST}:{p.s3}",
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            "RAY_ADDRESS": f"{HOST}:{p.ray}",
            "RAY_AUTH_MODE": "token",  # `ray start --head` turns on token auth for every client
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{p.mlflow}",
            "PREFECT_API_URL": f"http://{HOST}:{p.prefect}/api",
        }
        if not os.environ.get("AWS_ACCESS_KEY_ID"):
            values.update(AWS_ACCESS_KEY_ID=LOCAL_KEY, AWS_SECRET_ACCESS_KEY=LOCAL_SECRET)
        return values

    def service_env(self, layout: Layout) -> dict[str, str]:
        """The environment every service and node starts with, as a cluster's pods would have."""
        env = {**os.environ, **self.exports(layout)}
        # Each service's local disk is the stack's: a flow run the Prefect worker starts keeps
        # its local state under state/, not in the project folder it runs from.
        env.update(LDMFLOW_HOME=str(self.home / "state"), PREFECT_HOME=str(self.home / "prefect"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_WORKER_QUERY_SECONDS="5", MLFLOW_S3_ENDPOINT_URL=env["AWS_ENDPOINT_URL"],
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        return env

    # -- processes ----------------------------------------------------------------------------

    def running(self) -> dict[str, int]:
        """Recorded processes that are still the ones `up` started: name -> pid."""
        alive = {}
        for path in sorted(self.pids.glob("*.pid")) if self.pids.exists() else []:
            pid, started = (int(x) for x in path.read_text().split())
            if _start_time(pid) == started:
                alive[path.stem] = pid
        return alive

    def orphaned(self) -> dict[str, int]:
        """Recorded process groups whose leader is gone but some member is not (a Ray node whose
        raylet died leaves its agents): Linux gives no new process a live group's id, so the
        group is still the one `up` started."""
        running = self.running()
        groups = {}
        for path in sorted(self.pids.glob("*.pid")) if self.pids.exists() else []:
            pid = int(path.read_text().split()[0])
            if path.stem not in running and _group_alive(pid):
                groups[path.stem] = pid
        return groups

    def start(self, name: str, command: list[str], env: dict[str, str]) -> int:
        self.pids.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        (self.pids / f"{name}.pid").write_text(f"{process.pid} {_start_time(process.pid)}\n")
        return process.pid

    def stop(self, name: str, pid: int, grace: float = 15.0) -> None:
        self.stop_all({name: pid}, grace)

    def stop_all(self, processes: dict[str, int], grace: float = 15.0) -> None:
        """SIGTERM each process group, SIGKILL what is left of them after ``grace`` seconds."""
        left = dict(processes)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in left.values():
                with contextlib.suppress(ProcessLookupError):  # gone already
                    os.killpg(pid, sig)
            deadline = time.monotonic() + wait
            while left and time.monotonic() < deadline:
                left = {name: pid for name, pid in left.items() if _group_alive(pid)}
                time.sleep(0.2)
            if not left:
                break
        for name in processes:
            (self.pids / f"{name}.pid").unlink(missing_ok=True)

    # -- the services -------------------------------------------------------------------------

    def commands(self, layout: Layout) -> dict[str, list[str]]:
        p = layout.ports
        ray_temp = self.home / "ray"
        commands = {
            "s3": [str(BIN / "moto_server"), "-H", HOST, "-p", str(p.s3)],
            "mlflow": [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(p.mlflow), "--workers", "1",
                       "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
                       "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts"],
            "prefect": [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(p.prefect)],
            "ray-head": [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", HOST,
                         "--port", str(p.ray), "--ray-client-server-port", str(p.ray_client), "--num-cpus", "0",
                         "--dashboard-host", HOST, "--dashboard-port", str(p.dashboard), "--temp-dir", str(ray_temp),
                         "--disable-usage-stats"],
        }
        for pool in layout.pools:
            commands[f"prefect-worker-{pool}"] = [str(BIN / "prefect"), "worker", "start", "--pool", pool,
                                                  "--type", "process", "--name", f"local-{pool}"]
        for k in range(1, layout.workers + 1):
            commands[f"ray-worker-{k}"] = self.worker_command(layout)
        return commands

    def worker_command(self, layout: Layout) -> list[str]:
        return [str(BIN / "ray"), "start", "--address", f"{HOST}:{layout.ports.ray}", "--block",
                "--node-ip-address", HOST, "--num-cpus", str(layout.worker_cpus), "--disable-usage-stats"]

    def up(self, layout: Layout, timeout: float) -> None:
        if len(str(self.home / "ray" / "session_2026-01-01_00-00-00_000000_000000" / "sockets" / "plasma_store")) \
                > UNIX_SOCKET_LIMIT:
            raise SystemExit(f"stack: --home {self.home} is too long for Ray's socket paths; choose a shorter one")
        self.save(layout)
        env = self.service_env(layout)
        running = self.running()
        servers = ["s3", "mlflow", "prefect", "ray-head"]
        commands = self.commands(layout)
        for name in servers:
            if name not in running:
                _require_free(name, _port_of(name, layout))
                self.start(name, commands[name], env)
        _wait(lambda: _s3_ready(layout), timeout, "s3", self.logs / "s3.log")
        _create_buckets(env, [MLFLOW_BUCKET, *layout.buckets])
        _wait(lambda: _http_ok(f"http://{HOST}:{layout.ports.prefect}/api/health"), timeout, "prefect",
              self.logs / "prefect.log")
        for name, command in commands.items():
            if name.startswith("prefect-worker-") and name not in running:
                self.start(name, command, env)
        _wait(lambda: _alive_nodes(env), timeout, "ray-head", self.logs / "ray-head.log")
        # Worker nodes join one at a time: on a loaded machine a node joining a GCS that is
        # still busy with another can time out, and is then started again.
        for name, command in commands.items():
            if name.startswith("ray-worker-") and name not in running:
                self.start_node(name, command, env, timeout)
        _wait(lambda: _http_ok(f"http://{HOST}:{layout.ports.mlflow}/health"), timeout, "mlflow",
              self.logs / "mlflow.log")

    def start_node(self, name: str, command: list[str], env: dict[str, str], timeout: float, attempts: int = 3) -> None:
        """Start a Ray worker node and wait until the cluster counts it, retrying a start that died."""
        for attempt in range(1, attempts + 1):
            before = _alive_nodes(env)
            while not before:  # the head's GCS did not answer the probe: ask again
                time.sleep(1)
                before = _alive_nodes(env)
            pid = self.start(name, command, env)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _group_alive(pid):
                if (_alive_nodes(env) or before) - before:  # a node id that was not there before
                    return
                time.sleep(1)
            self.stop(name, pid, grace=5)
            print(f"stack: {name} did not join (attempt {attempt} of {attempts})", file=sys.stderr)
        log = self.logs / f"{name}.log"
        raise SystemExit(f"stack: {name} did not join the Ray cluster; the end of {log}:\n"
                         f"{log.read_text(errors='replace')[-2000:]}")

    def add_node(self, layout: Layout, timeout: float) -> str:
        name = f"ray-extra-{int(time.time() * 1000)}"
        self.start_node(name, self.worker_command(layout), self.service_env(layout), timeout)
        return name

    def down(self) -> list[str]:
        running = {**self.orphaned(), **self.running()}
        # Workers first, then what they talk to; Ray nodes before the head.
        rank = {"prefect-worker": 0, "ray-worker": 1, "ray-extra": 1, "ray-head": 2, "mlflow": 3, "prefect": 4, "s3": 5}
        level = {name: next((v for k, v in rank.items() if name.startswith(k)), 9) for name in running}
        names = sorted(running, key=level.get)
        for step in sorted(set(level.values())):  # each level's processes stop together
            # A head whose workers are gone does not finish on SIGTERM alone: it gets a short grace.
            self.stop_all({name: running[name] for name in names if level[name] == step},
                          grace=3.0 if step == rank["ray-head"] else 15.0)
        for stale in self.pids.glob("*.pid") if self.pids.exists() else []:
            stale.unlink()  # recorded, but no longer ours: nothing to stop
        return names


# -- readiness checks --------------------------------------------------------------------------


def _wait(ready, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # an exception means: not answering yet
            if ready():
                return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise SystemExit(f"stack: {what} did not answer within {timeout:.0f}s; the end of {log}:\n{tail}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def _s3_ready(layout: Layout) -> bool:
    with socket.create_connection((HOST, layout.ports.s3), timeout=1):
        return True


def _create_buckets(env: dict[str, str], buckets: list[str]) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in dict.fromkeys(buckets):
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def _alive_nodes(env: dict[str, str]) -> set[str] | None:
    """The ids of the alive Ray nodes, asked of the GCS by a short-lived client (it needs the
    auth token); None when the GCS does not answer."""
    probe = ("import json, ray; ray.init(logging_level='ERROR', log_to_driver=False); "
             "print('ALIVE=' + json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
    try:
        result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    answers = [line for line in result.stdout.splitlines() if line.startswith("ALIVE=")]  # Ray prints too
    return set(json.loads(answers[-1][len("ALIVE="):])) if result.returncode == 0 and answers else None


def _port_of(name: str, layout: Layout) -> int | None:
    return {"s3": layout.ports.s3, "mlflow": layout.ports.mlflow, "prefect": layout.ports.prefect,
            "ray-head": layout.ports.ray}.get(name)


def _require_free(name: str, port: int | None) -> None:
    if port is None:
        return
    with socket.socket() as probe:
        if probe.connect_ex((HOST, port)) == 0:
            raise SystemExit(f"stack: port {port} for {name} is taken by a process this stack did not start; "
                             f"stop it or choose another port (see --help)")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group whose members are all zombies is gone for our purposes.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# -- configuration ------------------------------------------------------------------------------


def buckets_of(config: Path) -> list[str]:
    """Every bucket an ``s3://`` URL of the cluster config names."""
    return sorted(set(re.findall(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])", config.read_text())))


def pools_of(prefect_yaml: Path) -> list[str]:
    import yaml

    spec = yaml.safe_load(prefect_yaml.read_text())
    return sorted({d["work_pool"]["name"] for d in spec.get("deployments", []) if d.get("work_pool")})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/local/stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("verb", choices=["up", "down", "status", "add-node"])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("LDMFLOW_STACK_HOME", ROOT / ".ldmflow" / "stack")),
                        help="folder for pid files, logs and state (env LDMFLOW_STACK_HOME; default .ldmflow/stack)")
    parser.add_argument("--workers", type=int, default=2, help="Ray worker nodes (up)")
    parser.add_argument("--worker-cpus", type=int, default=1, help="logical CPUs of each worker node (up)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local-cluster.yaml",
                        help="the cluster config whose s3:// buckets `up` creates")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each service")
    defaults = Ports()
    for name in asdict(defaults):
        parser.add_argument(f"--{name.replace('_', '-')}-port", type=int, default=None,
                            help=f"port of {name} (default {getattr(defaults, name)}, or what stack.json recorded)")
    args = parser.parse_args(argv)
    stack = Stack(args.home)
    recorded = stack.load()

    if args.verb == "up":
        layout = recorded if recorded and stack.running() else Layout()
        ports = asdict(layout.ports)
        ports.update({k: v for k in ports if (v := getattr(args, f"{k}_port")) is not None})
        layout = Layout(ports=Ports(**ports), workers=args.workers, worker_cpus=args.worker_cpus,
                        buckets=buckets_of(args.config), pools=pools_of(ROOT / "prefect.yaml"))
        stack.up(layout, args.timeout)
        for key, value in stack.exports(layout).items():
            print(f"export {key}={value}")
        print(f"# ldmflow local stack up: {len(stack.running())} processes, logs in {stack.logs}", file=sys.stderr)
    elif args.verb == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    elif args.verb == "add-node":
        if recorded is None or "ray-head" not in stack.running():
            raise SystemExit("stack: no Ray head is running; run `up` first")
        print(stack.add_node(recorded, args.timeout))
    else:
        running = stack.running()
        if recorded is None or not running:
            print(f"no stack running under {stack.home}")
            return 3
        ports = recorded.ports
        answers = {"s3": lambda: _s3_ready(recorded), "mlflow": lambda: _http_ok(f"http://{HOST}:{ports.mlflow}/health"),
                   "prefect": lambda: _http_ok(f"http://{HOST}:{ports.prefect}/api/health")}
        for name in sorted(set(stack.commands(recorded)) | set(running)):
            state = f"running (pid {running[name]})" if name in running else "stopped"
            if name in running and name in answers:
                try:
                    state += ", answers" if answers[name]() else ", not answering"
                except Exception:
                    state += ", not answering"
            print(f"{name:28} {state}")
        for key, value in stack.exports(recorded).items():
            print(f"export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
