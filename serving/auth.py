"""API keys of the HTTP API.

Keys come from the environment (``LDMFLOW_API_KEYS``, separated by commas or whitespace) or
from a file named by ``serve.api_keys_file`` (one key a line, ``#`` comments), never from a
config file itself. The process that starts the application reads them and hands the
replicas only their SHA-256 digests: a key never travels through Ray, never reaches a log
or the dashboard. A request presents ``Authorization: Bearer KEY``; its digest is compared
with every configured one in constant time.

Promotion keys are apart (``LDMFLOW_PROMOTE_KEYS``, ``serve.promote_keys_file``): only they
may move ``production`` (``POST /v1/promote``, ``/v1/reject``), and they may also draw. Each
may carry the name of who holds it (``ana:KEY``), recorded with every decision made with it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from pathlib import Path

from ldmflow.errors import UsageError

ENV = "LDMFLOW_API_KEYS"
PROMOTE_ENV = "LDMFLOW_PROMOTE_KEYS"
# A load balancer's health check carries no key, nor does a browser fetching the page (the
# page asks for the key and sends it with every call it makes).
OPEN_PATHS = ("/healthz", "/", "/page/page.js", "/page/page.css")
PROMOTE_PATHS = ("/v1/promote", "/v1/reject")  # only a promotion key opens these


class AuthError(UsageError):
    """Keys that cannot be read, or a server that would be open to anyone who reaches it."""


def load_keys(environ: dict[str, str], keys_file: str = "", env: str = ENV, field: str = "api_keys_file") -> list[str]:
    """The configured keys: ``$env`` (``LDMFLOW_API_KEYS``) and the lines of ``keys_file``."""
    keys = environ.get(env, "").replace(",", " ").split()
    if keys_file:
        try:
            text = Path(keys_file).read_text()
        except OSError as exc:
            raise AuthError(f"serve.{field} {keys_file}: cannot read it: {exc.strerror or exc}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    short = [key for key in keys if len(key) < 16]
    if short:
        raise AuthError(f"{len(short)} API key(s) shorter than 16 characters: use long random keys "
                        "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return keys


def digests(keys: list[str]) -> list[str]:
    return sorted({hashlib.sha256(key.encode()).hexdigest() for key in keys})


def promote_key_digests(environ: dict[str, str], keys_file: str = "") -> dict[str, str]:
    """The promotion keys' digests, each with who holds it: ``who:KEY`` names them, a bare
    key is known by the start of its digest."""
    named = {}
    for entry in load_keys(environ, keys_file, PROMOTE_ENV, "promote_keys_file"):
        who, _, key = entry.rpartition(":")
        digest = hashlib.sha256(key.encode()).hexdigest()
        named[digest] = who or f"key {digest[:8]}"
    return named


def holder(authorization: str | None, named_digests: dict[str, str]) -> str | None:
    """Who holds the key an ``Authorization`` header carries, among ``named_digests``
    (digest -> who), compared as :func:`allowed` compares; None for no such key."""
    found = None
    for digest, who in named_digests.items():
        if allowed(authorization, (digest,)):
            found = who
    return found


def allowed(authorization: str | None, key_digests: tuple[str, ...] | list[str]) -> bool:
    """Whether an ``Authorization`` header carries one of the keys: every digest is compared,
    each in constant time, whatever matched first."""
    scheme, _, token = (authorization or "").partition(" ")
    presented = hashlib.sha256(token.strip().encode()).hexdigest()
    match = False
    for digest in key_digests:
        match |= hmac.compare_digest(presented, digest)
    return match and scheme.lower() == "bearer"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str | None, key_digests: list[str] | dict, allow_unauthenticated: bool) -> None:
    """Refuse an API without keys that anyone else could reach: ``host`` not a loopback
    address (None: the address is decided elsewhere, as under KubeRay), unless the config
    says ``allow_unauthenticated: true``."""
    if key_digests or allow_unauthenticated or (host is not None and is_loopback(host)):
        return
    where = f"serve.host {host}" if host is not None else "a served application"
    raise AuthError(f"{where} without API keys would answer anyone who reaches it: set {ENV} (or "
                    "serve.api_keys_file), or serve.allow_unauthenticated: true if something in front "
                    "of it checks who calls")
