"""The gateway reads replicas' prefix reports (/internal/prefix) and routes by them.

The replicas are the fake backend plus a real PrefixRegistry (the engine's own class)
served over real HTTP; tests/integration/test_active_active_gateways.py runs real engines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from strata.engine.prefix_registry import PrefixRegistry
from strata.internal_auth import HEADER
from strata.routing.prompt import PromptEstimator

from .servers import FAST_POLL, LoadBackend, completion, gateway, report, serve, wait_for

EST = PromptEstimator()
PROMPT = "The archive of the district lists every permit granted there. " * 40  # ~2.5 kB
KEYS = EST.from_body(completion(PROMPT), chat=False).prefix_hashes


class PrefixBackend(LoadBackend):
    """A fake replica that reports a PrefixRegistry's keys, wanting ``token`` if given."""

    def __init__(self, token: str | None = None, chunk_bytes: int = EST.chunk_bytes) -> None:
        super().__init__(report())
        self.registry = PrefixRegistry(16, chunk_bytes=chunk_bytes, chunk_tokens=EST.chunk_tokens)
        self.token = token
        self.polls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/internal/prefix":
            self.polls += 1
            headers = dict(scope["headers"])
            if self.token is not None and headers.get(HEADER.encode()) != self.token.encode():
                await self._send(send, 401, {"error": {"message": "token"}})
                return
            query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
            since = int(query["since"]) if "since" in query else None
            await self._send(send, 200, self.registry.report(query.get("epoch"), since).to_dict())
            return
        await super().__call__(scope, receive, send)

    @staticmethod
    async def _send(send: Any, status: int, body: dict[str, Any]) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def hold(backend: PrefixBackend, seq_id: int = 1) -> None:
    """The replica admits PROMPT: its keys are reported (queued, then held)."""
    backend.registry.admit(seq_id, tuple((h, (i + 1) * 64) for i, h in enumerate(KEYS)))


async def test_a_prefix_another_gateway_sent_attracts_the_request() -> None:
    cold, warm = PrefixBackend(), PrefixBackend()
    hold(warm)  # as if another gateway had sent PROMPT there
    async with serve(cold) as cold_url, serve(warm) as warm_url, \
            gateway([cold_url, warm_url]) as (gw, client):
        r = gw.replicas.replicas[warm_url]
        await wait_for(lambda: r.prefix_source == "engine" and r.prefix.match(KEYS) == len(KEYS))
        for _ in range(4):
            resp = await client.post("/v1/completions", json=completion(PROMPT))
            assert resp.headers["x-strata-replica"] == warm_url
        # The replica evicts it (here: the queued prompt ends unprefilled): the next
        # delta removes it, and nothing this gateway sent keeps it alive past the grace.
        warm.registry.release(1)
        await wait_for(lambda: r.prefix.reported == set())
        assert r.prefix.since()[0] == warm.registry.epoch
        await wait_for(lambda: r.prefix.match(KEYS) == 0)  # its own sends lapse after a report


async def test_a_replica_restart_is_read_whole_again() -> None:
    backend = PrefixBackend()
    hold(backend)
    async with serve(backend) as url, gateway([url]) as (gw, _):
        r = gw.replicas.replicas[url]
        await wait_for(lambda: r.prefix.reported == set(KEYS))
        backend.registry = PrefixRegistry(16, chunk_bytes=EST.chunk_bytes,
                                          chunk_tokens=EST.chunk_tokens)  # a new process
        await wait_for(lambda: r.prefix.reported == set())
        assert r.prefix.since() == (backend.registry.epoch, 0)


async def test_reports_want_the_internal_token() -> None:
    backend = PrefixBackend(token="cluster-token")
    hold(backend)
    async with serve(backend) as url:
        async with gateway([url]) as (gw, _):
            r = gw.replicas.replicas[url]
            await wait_for(lambda: r.prefix_source == "none")  # refused: own requests only
            polls = backend.polls
            await asyncio.sleep(0.3)  # several load polls: the refused report is not asked again
            assert backend.polls == polls and r.prefix.reported is None
        config = dataclasses.replace(FAST_POLL, internal_token="cluster-token")
        async with gateway([url], replica_set=config) as (gw, _):
            r = gw.replicas.replicas[url]
            await wait_for(lambda: r.prefix.reported == set(KEYS))


async def test_reports_in_other_chunks_are_not_used() -> None:
    backend = PrefixBackend(chunk_bytes=128)
    hold(backend)
    async with serve(backend) as url, gateway([url]) as (gw, _):
        r = gw.replicas.replicas[url]
        await wait_for(lambda: r.prefix_source == "none")
        assert r.prefix.reported is None and r.prefix.match(KEYS) == 0
