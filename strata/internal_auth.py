"""The cluster's internal token: who may call admin endpoints and open stage links.

One secret per cluster. `strata serve` generates it and hands it to every child it
starts; a service started by hand takes it with ``--internal-token-file`` (or the
``STRATA_INTERNAL_TOKEN`` variable, read only in the CLI layer). Admin HTTP endpoints
(``/drain``, ``/stages/replicas``, ...) want it in the ``x-strata-internal-token``
header; stage links prove knowledge of it with an HMAC over the listener's nonce
(see `strata.stages.links`), so it never crosses the wire there.

A service with no token configured is a standalone one on a developer's machine: its
admin endpoints and links then accept loopback peers only, never a remote one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

from strata.protocol import error_body

HEADER = "x-strata-internal-token"
ENV_VAR = "STRATA_INTERNAL_TOKEN"
FILE_NAME = "internal-token"


def generate_token() -> str:
    """A fresh random cluster token (URL-safe, 256 bits)."""
    return secrets.token_urlsafe(32)


def write_token_file(directory: Path, token: str) -> Path:
    """Write `token` to a file only this user can read (0600, created that way, no race)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    return path


def load_token(path: Path | None, env_value: str | None) -> str | None:
    """The token from `path` (wins) or the environment's value; None when neither is given.

    Fails with a message naming the source when it is empty or unreadable, so that a
    misconfigured service never starts with admin endpoints open to the network.
    """
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise ValueError(f"--internal-token-file {path}: cannot read it ({e})") from e
        if not token:
            raise ValueError(f"--internal-token-file {path} is empty; write the cluster token into it")
        return token
    if env_value is not None:
        token = env_value.strip()
        if not token:
            raise ValueError(f"{ENV_VAR} is set but empty; unset it or give the cluster token")
        return token
    return None


def token_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison (no timing side channel on how much of the token matched)."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 (and IPv4-mapped loopback); False for names and unknowns."""
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def headers(token: str | None) -> dict[str, str]:
    """Headers an internal caller sends to another service's admin endpoint."""
    return {HEADER: token} if token else {}


def admin_denial(request: Request, token: str | None) -> JSONResponse | None:
    """None if `request` may call an admin endpoint, else the OpenAI-format error to answer.

    With a token: the header must carry it (401 otherwise). Without one: only a
    loopback client may (403 otherwise).
    """
    if token is not None:
        if token_matches(token, request.headers.get(HEADER)):
            return None
        why = "missing" if HEADER not in request.headers else "invalid"
        return JSONResponse(error_body(
            f"{why} internal token: admin endpoints need the cluster's token in the "
            f"'{HEADER}' header", "authentication_error", None, "invalid_internal_token"), 401)
    client = request.client.host if request.client else None
    if is_loopback(client):
        return None
    return JSONResponse(error_body(
        "admin endpoints of a service without an internal token answer loopback clients only; "
        "start it with --internal-token-file to manage it remotely", "permission_denied", None,
        "loopback_only"), 403)


def link_proof(token: str, label: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of the token over a domain label and length-prefixed parts."""
    mac = hmac.new(token.encode(), digestmod=hashlib.sha256)
    mac.update(label)
    for p in parts:
        mac.update(len(p).to_bytes(4, "little"))
        mac.update(p)
    return mac.digest()
