"""The cluster's internal token: loading it, comparing it, and the engine's admin endpoint."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from strata.engine.engine import AsyncEngine, EngineConfig, build_engine_core
from strata.engine.server import build_app
from strata.internal_auth import (
    HEADER,
    generate_token,
    is_loopback,
    link_proof,
    load_token,
    token_matches,
    write_token_file,
)


def test_token_file_wins_and_is_written_private(tmp_path: Path) -> None:
    token = generate_token()
    assert len(token) >= 40 and token != generate_token()
    path = write_token_file(tmp_path / "run", token)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_token(path, "from-env") == token
    assert load_token(None, " from-env\n") == "from-env"
    assert load_token(None, None) is None


def test_empty_or_missing_tokens_fail_naming_the_source(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_token(empty, None)
    with pytest.raises(ValueError, match="cannot read"):
        load_token(tmp_path / "absent", None)
    with pytest.raises(ValueError, match="STRATA_INTERNAL_TOKEN"):
        load_token(None, "  ")


def test_compare_and_loopback() -> None:
    assert token_matches("abc", "abc")
    assert not token_matches("abc", "abd") and not token_matches("abc", None)
    assert not token_matches("abc", "ab")
    for host in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "0.0.0.0", "::", "localhost", "", None, "fe80::1%eth0"):
        assert not is_loopback(host), host


def test_link_proofs_bind_label_and_every_part() -> None:
    base = link_proof("t", b"peer", b"n1", b"n2")
    assert base == link_proof("t", b"peer", b"n1", b"n2")
    assert base != link_proof("u", b"peer", b"n1", b"n2")
    assert base != link_proof("t", b"listener", b"n1", b"n2")
    assert base != link_proof("t", b"peer", b"n1n", b"2")  # parts are length-prefixed


@pytest.fixture(scope="module")
def engine(tiny_hf_dir: Path) -> AsyncEngine:
    core = build_engine_core(EngineConfig(model=str(tiny_hf_dir), dtype="float32", device="cpu",
                                          threads=1, num_kv_blocks=16))
    return AsyncEngine(core)


async def _drain(app: object, client: str, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client, 40000))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as http:
        return await http.post("/drain", headers=headers)


async def test_engine_drain_needs_the_token(engine: AsyncEngine) -> None:
    engine.core.draining = False
    app = build_app(engine, internal_token="s3cret")
    for headers in ({}, {HEADER: "wrong"}, {HEADER: "s3cret-and-more"}):
        r = await _drain(app, "127.0.0.1", headers)  # loopback is not enough with a token
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and HEADER in err["message"]
        assert not engine.core.draining
    r = await _drain(app, "10.1.2.3", {HEADER: "s3cret"})
    assert r.status_code == 200 and r.json()["status"] == "draining" and engine.core.draining


async def test_engine_without_a_token_drains_for_loopback_clients_only(engine: AsyncEngine) -> None:
    engine.core.draining = False
    app = build_app(engine)
    r = await _drain(app, "10.1.2.3", {HEADER: "anything"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "loopback_only"
    assert not engine.core.draining
    r = await _drain(app, "::1", {})
    assert r.status_code == 200 and engine.core.draining
