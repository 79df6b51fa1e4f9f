"""Authenticated frame links: the handshake, `connect` and `serve`.

Nothing but the handshake crosses a link until both ends proved they hold the
cluster's internal token: the listener sends a random nonce, the connecting peer
answers with its own nonce, its role and HMAC-SHA256(token, label, both nonces, role),
and the listener answers with its own proof over both nonces. So each side knows the
other belongs to the cluster, and the token itself never crosses the wire (a recorded
handshake is useless: the next listener nonce differs). A listener without a token
accepts loopback peers only, and a side with a token refuses a peer without one. Until
the handshake is done a frame may be at most `PREAUTH_MAX_FRAME_BYTES`, and only a
bounded number of links may be in their handshake at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

from strata.internal_auth import is_loopback, link_proof
from strata.stages.transport import (
    AUTH,
    DEFAULT_MAX_QUEUED,
    ERROR,
    KINDS,
    MAX_FRAME_BYTES,
    Connection,
    Frame,
)

log = logging.getLogger("strata.stages.links")

PREAUTH_MAX_FRAME_BYTES = 64 << 10  # the handshake's frames are tiny
HANDSHAKE_TIMEOUT_S = 10.0


class LinkAuthError(ConnectionError):
    """The link handshake failed: a peer without the cluster's token, or none at all."""


def _proof(token: str, label: bytes, listener_nonce: bytes, peer_nonce: bytes, role: str) -> str:
    return link_proof(token, label, listener_nonce, peer_nonce, role.encode()).hex()


_PEER_LABEL = b"strata-link/peer/v1"
_LISTENER_LABEL = b"strata-link/listener/v1"


def _nonce(meta: dict[str, Any], key: str) -> bytes:
    value = meta.get(key)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise LinkAuthError(f"handshake {key} must be 32 bytes of hex")
    return raw


async def _refuse(conn: Connection, why: str) -> LinkAuthError:
    with contextlib.suppress(OSError, RuntimeError):
        await conn.send(Frame(ERROR, 0, {"message": f"link refused: {why}"}))
    conn.close()
    return LinkAuthError(why)


async def accept_handshake(conn: Connection, token: str | None,
                           timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Listener side: authenticate the peer before any other frame is processed.

    Raises `LinkAuthError` (after sending the peer an ERROR frame and closing) when the
    peer gives no or a wrong proof, says nothing in time, or, without a token here, is
    not on loopback.
    """
    conn.max_frame_bytes = PREAUTH_MAX_FRAME_BYTES
    if token is None and not is_loopback(conn.peer_host):
        raise await _refuse(conn, "this stage runs without an internal token and accepts "
                                  "loopback peers only; give every service --internal-token-file")
    nonce = secrets.token_bytes(32)
    await conn.send(Frame(AUTH, 0, {"nonce": nonce.hex(), "mode": "none" if token is None else "hmac"}))
    try:
        reply = await asyncio.wait_for(conn.recv(), timeout_s)
    except TimeoutError:
        raise await _refuse(conn, f"no handshake within {timeout_s:g} s") from None
    if reply is None:
        exc = conn.closed.result() if conn.closed.done() else None
        raise LinkAuthError(f"the peer left during the handshake ({exc or 'closed'})")
    if reply.kind != AUTH:
        raise await _refuse(conn, f"expected the handshake, got a {KINDS.get(reply.kind, reply.kind)} frame")
    role = reply.meta.get("role")
    if not isinstance(role, str) or len(role) > 32:
        raise await _refuse(conn, "the handshake names no role")
    peer_nonce = b""
    if token is not None:
        try:
            peer_nonce = _nonce(reply.meta, "nonce")
        except LinkAuthError as e:
            raise await _refuse(conn, str(e)) from None
        given = reply.meta.get("proof")
        want = _proof(token, _PEER_LABEL, nonce, peer_nonce, role)
        if not isinstance(given, str) or not secrets.compare_digest(given, want):
            raise await _refuse(conn, "wrong internal token (the HMAC proof does not match)")
    answer: dict[str, Any] = {"ok": True}
    if token is not None:
        answer["proof"] = _proof(token, _LISTENER_LABEL, nonce, peer_nonce, role)
    await conn.send(Frame(AUTH, 0, answer))
    conn.peer_role = role


async def _connect_handshake(conn: Connection, token: str | None, role: str,
                             timeout_s: float) -> None:
    """Connecting side: answer the listener's nonce and check its proof in return."""
    limit, conn.max_frame_bytes = conn.max_frame_bytes, PREAUTH_MAX_FRAME_BYTES

    async def next_frame(what: str) -> Frame:
        try:
            frame = await asyncio.wait_for(conn.recv(), timeout_s)
        except TimeoutError:
            raise LinkAuthError(f"{conn.peer}: no {what} within {timeout_s:g} s") from None
        if frame is None:
            raise LinkAuthError(f"{conn.peer} closed the link during the handshake")
        if frame.kind == ERROR:
            raise LinkAuthError(f"{conn.peer}: {frame.meta.get('message', 'refused')}")
        if frame.kind != AUTH:
            raise LinkAuthError(f"{conn.peer} sent a {KINDS.get(frame.kind, frame.kind)} frame "
                                f"instead of the {what}; is it a strata stage?")
        return frame

    challenge = await next_frame("challenge")
    mode = challenge.meta.get("mode")
    listener_nonce = _nonce(challenge.meta, "nonce")
    if mode == "hmac" and token is None:
        raise LinkAuthError(f"{conn.peer} requires the cluster's internal token; give this "
                            "service --internal-token-file (or STRATA_INTERNAL_TOKEN)")
    if mode == "none" and token is not None:
        raise LinkAuthError(f"{conn.peer} runs without an internal token, so it cannot prove "
                            "it belongs to this cluster; give it the cluster's token")
    if mode not in ("hmac", "none"):
        raise LinkAuthError(f"{conn.peer}: unknown handshake mode {mode!r}")
    hello: dict[str, Any] = {"role": role}
    nonce = secrets.token_bytes(32)
    if token is not None:
        hello.update(nonce=nonce.hex(), proof=_proof(token, _PEER_LABEL, listener_nonce, nonce, role))
    await conn.send(Frame(AUTH, 0, hello))
    answer = await next_frame("handshake answer")
    if token is not None:
        want = _proof(token, _LISTENER_LABEL, listener_nonce, nonce, role)
        given = answer.meta.get("proof")
        if not isinstance(given, str) or not secrets.compare_digest(given, want):
            raise LinkAuthError(f"{conn.peer} does not hold the cluster's internal token")
    conn.max_frame_bytes = limit


async def connect(host: str, port: int, timeout_s: float = 10.0, *, token: str | None = None,
                  role: str = "peer", max_frame_bytes: int = MAX_FRAME_BYTES,
                  max_queued: int = DEFAULT_MAX_QUEUED) -> Connection:
    """Open an authenticated frame link to host:port (see `accept_handshake`)."""
    loop = asyncio.get_running_loop()
    conn = Connection(max_frame_bytes, max_queued)
    await asyncio.wait_for(
        loop.create_connection(lambda: conn.protocol, host, port), timeout=timeout_s
    )
    conn.peer = f"{host}:{port}"
    conn.peer_host = host
    try:
        await _connect_handshake(conn, token, role, timeout_s)
    except BaseException:
        conn.close()
        raise
    return conn


async def serve(
    host: str, port: int, on_connection: Callable[[Connection], Any], *,
    token: str | None = None, max_frame_bytes: int | Callable[[], int] = MAX_FRAME_BYTES,
    max_queued: int = DEFAULT_MAX_QUEUED, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    max_pending_handshakes: int = 64,
) -> asyncio.Server:
    """Listen for frame links; `on_connection` (a coroutine function) runs per authenticated link.

    `max_frame_bytes` (a number, or a function read when a link is accepted) bounds
    each frame after the handshake. At most `max_pending_handshakes` unauthenticated
    links are held at once; more are closed at once, so a flood of idle connections
    costs at most that many small buffers for `handshake_timeout_s` each.
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()
    pending = 0

    def factory() -> asyncio.BufferedProtocol:
        conn = Connection(PREAUTH_MAX_FRAME_BYTES, max_queued)
        task = loop.create_task(_handle(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return conn.protocol

    async def _handle(conn: Connection) -> None:
        nonlocal pending
        while conn.protocol.transport is None:
            await asyncio.sleep(0)
        peer = conn.protocol.transport.get_extra_info("peername")
        conn.peer = f"{peer[0]}:{peer[1]}" if peer else ""
        conn.peer_host = str(peer[0]) if peer else ""
        if pending >= max_pending_handshakes:
            log.warning("frame link from %s closed: %d handshakes already pending",
                        conn.peer or "?", pending)
            conn.protocol.transport.abort()
            return
        pending += 1
        try:
            await accept_handshake(conn, token, handshake_timeout_s)
        except (LinkAuthError, ConnectionError, OSError) as e:
            log.warning("frame link from %s refused: %s", conn.peer or "?", e)
            conn.close()
            return
        finally:
            pending -= 1
        conn.max_frame_bytes = max_frame_bytes() if callable(max_frame_bytes) else max_frame_bytes
        try:
            await on_connection(conn)
        except Exception:  # noqa: BLE001 - one link's failure must not go unreported or spread
            log.exception("frame link from %s failed", conn.peer or "?")
            conn.close()

    return await loop.create_server(factory, host, port)
