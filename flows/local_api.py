"""Prefect's local API, kept running between commands.

With no ``PREFECT_API_URL``, Prefect starts a temporary API server for each command and
stops it at exit: importing the server and opening its database cost about ten seconds
(more on a slow machine) before the first task runs. Instead, the first command that runs a
flow starts that same server (Prefect's app, on uvicorn, without its UI) as a background
process under the state folder, and later commands reuse it, so a command's fixed cost is
its own imports and Prefect's bookkeeping of the run.

Files, in ``<state>/prefect/``:

- ``local-api.json``: the server's URL and process id;
- ``local-api.users``: every process using the server holds a shared lock on it for its
  whole life (the kernel drops the lock when the process ends, however it ends);
- ``local-api.lock``: held while a server is checked or started, so that two commands
  started together end up with one server;
- ``local-api.log``: the server's own output.

The server stops by itself once no process has held a user lock for
``LDMFLOW_LOCAL_API_IDLE_SECONDS`` (default 600): it takes the users file's exclusive lock
and keeps it until it has exited, so a command arriving meanwhile waits, then starts a new
one. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ldmflow.errors import LdmflowError

IDLE_ENV = "LDMFLOW_LOCAL_API_IDLE_SECONDS"
DEFAULT_IDLE_SECONDS = 600
STARTUP_TIMEOUT_SECONDS = 180

_users_lock: int | None = None  # this process's shared lock on the users file, held until exit


class LocalApiError(LdmflowError):
    """The local Prefect API could not be started."""


def use(prefect_home: Path) -> str:
    """The URL of the local API under ``prefect_home``, started if none is running, and set
    as ``PREFECT_API_URL`` for this process and its children. Call before Prefect is
    imported (it reads its settings then). A URL already in the environment is kept."""
    global _users_lock
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    prefect_home.mkdir(parents=True, exist_ok=True)
    if _users_lock is None:
        _users_lock = os.open(prefect_home / "local-api.users", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(_users_lock, fcntl.LOCK_SH)  # waits while a server is stopping
    with open(prefect_home / "local-api.lock", "a") as start_lock:
        fcntl.flock(start_lock, fcntl.LOCK_EX)
        url = _running(prefect_home)
        if url is None:
            url = _start(prefect_home)
    os.environ["PREFECT_API_URL"] = url
    return url


def _running(prefect_home: Path) -> str | None:
    """The recorded server's URL if it answers."""
    try:
        url = json.loads((prefect_home / "local-api.json").read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if _healthy(url) else None


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _start(prefect_home: Path) -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    log = prefect_home / "local-api.log"
    idle = os.environ.get(IDLE_ENV, str(DEFAULT_IDLE_SECONDS))
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ldmflow.flows.local_api", "--port", str(port), "--idle-seconds", idle,
             "--users", str(prefect_home / "local-api.users")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"},
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not _healthy(url, timeout=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise LocalApiError(f"the local Prefect API did not start on {url} (its log, {log}: {' | '.join(tail)})")
        time.sleep(0.2)
    record = prefect_home / "local-api.json"
    record.with_suffix(".tmp").write_text(json.dumps({"url": url, "pid": process.pid}) + "\n")
    record.with_suffix(".tmp").replace(record)
    return url


def serve(port: int, users: Path, idle_seconds: float) -> None:
    """Run Prefect's API (as its temporary server does: no UI) until idle."""
    os.environ.update(PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
    import uvicorn
    from prefect.server.api.server import create_app

    server = uvicorn.Server(uvicorn.Config(create_app, factory=True, host="127.0.0.1", port=port,
                                           log_level="error", lifespan="on"))
    threading.Thread(target=_stop_when_idle, args=(server, users, idle_seconds), daemon=True).start()
    server.run()


def _stop_when_idle(server, users: Path, idle_seconds: float, poll: float = 1.0) -> None:
    handle = os.open(users, os.O_RDWR | os.O_CREAT, 0o600)
    idle_since = time.monotonic()
    while True:
        time.sleep(poll)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # someone is using the server
            idle_since = time.monotonic()
            continue
        if time.monotonic() - idle_since >= idle_seconds:
            server.should_exit = True  # the exclusive lock is kept until this process has exited
            return
        fcntl.flock(handle, fcntl.LOCK_UN)


def main() -> None:
    parser = argparse.ArgumentParser(description="Prefect's local API for ldmflow commands, stopped when idle.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--users", type=Path, required=True, help="the file whose shared locks mark its users")
    parser.add_argument("--idle-seconds", type=float, default=DEFAULT_IDLE_SECONDS)
    args = parser.parse_args()
    serve(args.port, args.users, args.idle_seconds)


if __name__ == "__main__":
    main()
