"""In-process servers on loopback for gateway tests: real HTTP, no mocks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import uvicorn

from strata.bench.fake_backend import FakeBackend, FakeBackendConfig
from strata.gateway.app import Gateway, GatewayConfig, create_app
from strata.gateway.replica_record import ReplicaSetConfig
from strata.gateway.replica_set import OnDemand
from strata.load import LoadReport

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

FAST_POLL = ReplicaSetConfig(poll_interval_s=0.05, health_interval_s=0.1, probe_timeout_s=1.0,
                             eject_base_s=0.3)


class _QuietServer(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave pytest's signal handlers alone
        yield


@asynccontextmanager
async def serve(app: ASGIApp, lifespan: str = "on") -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a free loopback port; yield its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan=lifespan, access_log=False, timeout_graceful_shutdown=1)
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "server did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def fake(ttft_ms: float = 1.0, itl_ms: float = 1.0, output_tokens: int = 8,
         model: str = "strata-fake") -> FakeBackend:
    """The shared fake OpenAI backend as an in-process ASGI app."""
    return FakeBackend(FakeBackendConfig(ttft_ms=ttft_ms, itl_ms=itl_ms,
                                         output_tokens=output_tokens, model=model))


class LoadBackend:
    """A fake backend that also serves GET /load from a report the test can change."""

    def __init__(self, report: LoadReport, **fake_kw: Any) -> None:
        self.report = report
        self.inner = fake(**fake_kw)
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/load":
            body = json.dumps(self.report.to_dict()).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "http" and scope["path"].startswith("/v1/c"):
            self.requests += 1
        await self.inner(scope, receive, send)


def report(**kw: Any) -> LoadReport:
    """An idle, measured strata load report with fields overridden."""
    base: dict[str, Any] = dict(
        model="strata-fake", running=0, waiting=0, waiting_prompt_tokens=0,
        free_kv_blocks=1000, total_kv_blocks=1000, block_size=16, max_num_seqs=64,
        max_num_batched_tokens=2048, prefix_hit_rate=0.0, prompt_tokens_per_s=10000.0,
        generation_tokens_per_s=500.0, decode_step_s=0.02, prefill_token_s=1e-4)
    base.update(kw)
    return LoadReport(**base)


@asynccontextmanager
async def gateway(replicas: list[str], on_demand: OnDemand | None = None,
                  wait_ready: int | None = None, **config: Any
                  ) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A gateway in front of ``replicas``, with a client; waits for them to be ready."""
    config.setdefault("replica_set", FAST_POLL)
    gw = create_app(GatewayConfig(replicas=tuple(replicas), **config), on_demand=on_demand)
    async with serve(gw) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        want = len(replicas) if wait_ready is None else wait_ready
        deadline = time.monotonic() + 10
        while gw.replicas.ready_count() < want:
            assert time.monotonic() < deadline, "replicas never became ready"
            await asyncio.sleep(0.02)
        yield gw, client


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def completion(prompt: str = "hello world", max_tokens: int = 4, stream: bool = False,
               model: str = "strata-fake", **kw: Any) -> dict[str, Any]:
    """A /v1/completions body."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream, **kw}


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    return 0.0


class FlakyServer:
    """A raw HTTP/1.1 server whose POSTs fail in a chosen way (GET /health is 200).

    Modes: "die" sends a 200 head then drops the connection before any body byte; "hangup"
    drops it without answering; "503" answers 503 (no Retry-After); "busy" answers 503 with
    Retry-After (the engine's "not started"); "500" and "400" answer those with an OpenAI
    error body; "midstream" sends one SSE event then drops the connection; "ok" streams two
    SSE events properly; "silent" waits ``silent_s`` and then answers a JSON body. GET
    /health answers while ``healthy``, and does not answer at all while ``frozen``.
    """

    def __init__(self, mode: str, silent_s: float = 0.0) -> None:
        self.mode = mode
        self.silent_s = silent_s
        self.posts = 0
        self.healthy = True
        self.frozen = False
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if head.startswith(b"GET /health"):
                    if self.frozen:
                        await asyncio.sleep(3600)
                    status = b"200 OK" if self.healthy else b"503 Service Unavailable"
                    writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nok")
                elif head.startswith(b"GET "):
                    writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                elif self.mode == "silent":
                    self.posts += 1
                    await asyncio.sleep(self.silent_s)
                    body = b'{"choices": [{"text": "done"}]}'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
                elif not self._post(writer):
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def _post(self, writer: asyncio.StreamWriter) -> bool:
        self.posts += 1
        sse_head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n")
        event = b'data: {"choices": [{"text": "x"}]}\n\n'
        chunk = b"%x\r\n%s\r\n" % (len(event), event)
        if self.mode == "die":
            writer.write(sse_head)
            return False
        if self.mode == "hangup":
            return False
        answers = {"503": (b"503 Service Unavailable", b""),
                   "busy": (b"503 Service Unavailable", b"retry-after: 2\r\n"),
                   "500": (b"500 Internal Server Error", b""), "400": (b"400 Bad Request", b"")}
        if self.mode in answers:
            status, extra = answers[self.mode]
            body = b'{"error": {"message": "%s from the replica"}}' % self.mode.encode()
            writer.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n%s"
                         b"content-length: %d\r\n\r\n%s" % (status, extra, len(body), body))
            return True
        if self.mode == "midstream":
            writer.write(sse_head + chunk)
            return False
        done = b"data: [DONE]\n\n"
        writer.write(sse_head + chunk + b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        return True
