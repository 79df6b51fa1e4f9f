"""The gateway service: an OpenAI-compatible front over a set of replicas.

The two generation endpoints are served by a raw ASGI handler (no framework routing, the
body parsed once, the upstream bytes passed through) because they carry the latency
budget; /v1/models, /health and /metrics go through Starlette. Admission order for a
generation request: body size -> API key -> parse -> the model's tier (404 when no tier
serves it) -> rate limit -> per-model slot -> route within the tier (hold while it has no
ready replica, waking it from zero) -> proxy. Each tier has its own replica set, policy
and proxy (strata.gateway.tiers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from strata.gateway.admission import Admission, QueueFull, QueueTimeout
from strata.gateway.auth import ApiKeys, KeyInfo
from strata.gateway.metrics import GatewayMetrics
from strata.gateway.proxy import (
    ClientState,
    GatewayError,
    MidstreamFailure,
    ProxyConfig,
)
from strata.gateway.ratelimit import Limits, RateLimiter
from strata.gateway.replica_record import ReplicaSetConfig
from strata.gateway.replica_set import OnDemand
from strata.gateway.tiers import TierLane, TierLanes, TierRoute
from strata.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    openapi_document,
    parse_json_body,
)
from strata.routing.prompt import PromptError, PromptEstimator
from strata.routing.registry import DEFAULT_POLICY

log = logging.getLogger("strata.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_GENERATION_PATHS = {"/v1/completions": False, "/v1/chat/completions": True}


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway is configured with, parsed once at start-up."""

    replicas: tuple[str, ...] = ()
    tier: str = "engine"
    policy: str = DEFAULT_POLICY
    policy_params: dict[str, Any] = field(default_factory=dict)
    replica_set: ReplicaSetConfig = field(default_factory=ReplicaSetConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    estimator: PromptEstimator = field(default_factory=PromptEstimator)
    api_keys: ApiKeys | None = None  # None or empty: no authentication
    default_limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 8 * 1024 * 1024
    max_in_flight_per_model: int | None = None
    max_queued_per_model: int = 1024
    queue_timeout_s: float = 30.0
    demand_tau_s: float = 60.0
    served_models: tuple[str, ...] = ()  # listed on /v1/models before a replica is ready
    # Generation requests the gateway holds at once (reading, queued, held, proxied);
    # beyond, 503 + Retry-After at once, so a flood cannot grow the gateway's memory.
    max_pending_requests: int = 8192
    # On SIGTERM: readiness goes 503, new requests get 503 + Retry-After, in-flight ones
    # get this long to finish; the rest are then ended with an error.
    drain_timeout_s: float = 120.0
    # Several tiers, routed by model; empty: the one tier of `tier`, `served_models` and
    # `replicas` above.
    tiers: tuple[TierRoute, ...] = ()

    def routes(self) -> tuple[TierRoute, ...]:
        """The tiers behind the gateway (the first takes requests without a model)."""
        return self.tiers or (TierRoute(self.tier, self.served_models, self.replicas),)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {', '.join(names)}")
        models = [m for t in self.tiers for m in t.served_models]
        if len(set(models)) != len(models):
            raise ValueError(f"each model is served by one tier, got {', '.join(models)}")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.queue_timeout_s < 0:
            raise ValueError("queue_timeout_s must be >= 0")
        if self.max_pending_requests < 1:
            raise ValueError("max_pending_requests must be >= 1")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")


class Gateway:
    """The ASGI application: hot generation paths by hand, the rest through Starlette."""

    def __init__(self, config: GatewayConfig, on_demand: OnDemand | None = None) -> None:
        """Build every part; replicas start polling when the app's lifespan starts."""
        self.config = config
        self.metrics = GatewayMetrics(config.policy)
        self.lanes = TierLanes(config.routes(), lambda route: TierLane(
            route, policy=config.policy, policy_params=config.policy_params,
            replica_set=config.replica_set, proxy=config.proxy, estimator=config.estimator,
            demand_tau_s=config.demand_tau_s, metrics=self.metrics, on_demand=on_demand))
        # The default tier's parts, under the names a one-tier gateway always had.
        self.replicas = self.lanes.default.replicas
        self.proxy = self.lanes.default.proxy
        self.policy = self.lanes.default.policy
        self.draining = False
        self._aborting = False  # past the drain timeout: what is left is ended now
        self._active: set[asyncio.Task[Any]] = set()  # generation handlers in flight
        self._stop_draining = asyncio.Event()
        self.admission = Admission(config.max_in_flight_per_model, config.max_queued_per_model)
        self.limiter = RateLimiter()
        self.keys = config.api_keys if config.api_keys is not None and len(config.api_keys) \
            else None
        self.starlette = Starlette(
            routes=[Route("/v1/models", self._models, methods=["GET"]),
                    Route("/health", self._health, methods=["GET"]),
                    Route("/metrics", self._metrics, methods=["GET"]),
                    Route("/openapi.json", self._openapi, methods=["GET"])],
            lifespan=self._lifespan)

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        for lane in self.lanes:
            await lane.replicas.set_endpoints(lane.route.replicas)
        try:
            yield
        finally:
            for lane in self.lanes:
                await lane.replicas.close()

    async def set_endpoints(self, urls: list[str], tier: str | None = None) -> None:
        """Replace a tier's replicas (default: the first tier's); the platform's feed calls this."""
        lane = self.lanes.default if tier is None else self.lanes[tier]
        await lane.replicas.set_endpoints(urls)

    # -- graceful stop -------------------------------------------------------------------

    async def drain(self, timeout_s: float | None = None) -> int:
        """Stop admitting, let in-flight requests finish, end the rest; how many were ended.

        From now on /health answers 503 and new generation requests 503 + Retry-After (they
        never started, so a client or load balancer retries them elsewhere). Requests still
        running after ``timeout_s`` (default ``drain_timeout_s``), or at once after
        ``stop_draining``, are ended: a stream with an SSE error event, an unanswered
        request with 503 + Retry-After, a started non-streaming body by closing it.
        """
        self.draining = True
        timeout = self.config.drain_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        stop = asyncio.create_task(self._stop_draining.wait())
        try:
            while self._active and not self._stop_draining.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.wait([*self._active, stop], timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        left = list(self._active)
        if left:
            log.warning("drain: %d request(s) still running after %.0f s; ending them",
                        len(left), timeout)
            self._aborting = True
            for t in left:
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        return len(left)

    def stop_draining(self) -> None:
        """End the drain now (a second signal): what is still running is ended."""
        self._stop_draining.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] == "http":
            chat = _GENERATION_PATHS.get(scope["path"])
            if chat is not None:
                if scope["method"] == "POST" and len(self.lanes) == 1:
                    self.lanes.default.arrivals.inc()  # refused ones too (else: per tier, below)
                await self._generation(scope, receive, send, chat)
                return
        await self.starlette(scope, receive, send)

    # -- generation ----------------------------------------------------------------------

    async def _generation(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self.draining:
            await _send_error(send, GatewayError(
                503, "this gateway is shutting down; retry (another instance will answer)",
                code="draining", headers=[(b"retry-after", b"1")]))
            return
        if len(self._active) >= self.config.max_pending_requests:
            self.metrics.rejected.labels(reason="overloaded").inc()
            await _send_error(send, GatewayError(
                503, f"the gateway holds {self.config.max_pending_requests} requests already; "
                "retry shortly", code="overloaded", headers=[(b"retry-after", b"1")]))
            return
        self._active.add(task)
        try:
            await self._generation_inner(scope, receive, send, chat, task)
        except asyncio.CancelledError:
            if not self._aborting:
                raise
            task.uncancel()  # ended by the drain timeout before it was forwarded (queued)
            await self._end_aborted(send, ClientState())
        finally:
            self._active.discard(task)

    async def _generation_inner(self, scope: Scope, receive: Receive, send: Send, chat: bool,
                                task: asyncio.Task[Any]) -> None:
        t0 = time.perf_counter()
        client = ClientState()
        try:
            if scope["method"] != "POST":
                raise GatewayError(405, f"{scope['path']} accepts POST only")
            who = self._authenticate(scope)
            body = await self._read_body(scope, receive)
            try:
                # The engine's parser: NaN literals, lone surrogates and deep nesting are
                # refused here too, before routing reads the prompt.
                parsed = parse_json_body(body)
            except OpenAIError as err:
                raise GatewayError(400, err.message, param=err.param) from None
            try:
                route = self.config.estimator.from_body(parsed, chat)
            except PromptError as err:
                raise GatewayError(400, str(err), param=err.param) from None
            lane = self.lanes.for_model(route.model)
            if len(self.lanes) > 1:
                lane.arrivals.inc()
            self._rate_limit(who, scope, route.total_tokens)
            queue = self.admission.queue(route.model)
            try:
                await queue.acquire(self.config.queue_timeout_s)
            except QueueTimeout as err:
                raise GatewayError(503, str(err), code="queue_timeout",
                                   headers=[(b"retry-after", b"1")]) from None
            except QueueFull as err:
                raise GatewayError(503, str(err), code="queue_full",
                                   headers=[(b"retry-after", b"1")]) from None
            watcher = asyncio.create_task(_watch_disconnect(receive, task, client))
            try:
                await lane.proxy.forward(send, scope["path"], body, route, queue, t0, client)
            except asyncio.CancelledError:
                if client.disconnected:
                    task.uncancel()
                    self.metrics.disconnects.inc()
                elif self._aborting:
                    task.uncancel()
                    await self._end_aborted(send, client)
                else:
                    raise  # the server's own shutdown
            finally:
                watcher.cancel()
                queue.release()
                self.admission.prune(queue)
        except GatewayError as err:
            self.metrics.rejected.labels(reason=err.code or str(err.status)).inc()
            await _send_error(send, err)
        except _ClientGone:
            self.metrics.disconnects.inc()
        except MidstreamFailure as err:
            # Headers are out; closing the connection is the only honest signal left.
            log.warning("response aborted: %s", err)

    async def _end_aborted(self, send: Send, client: ClientState) -> None:
        """End a request the drain timeout cut: 503 if unanswered, else an SSE error event."""
        self.metrics.rejected.labels(reason="drain_timeout").inc()
        err = GatewayError(503, f"the gateway stopped after its {self.config.drain_timeout_s:g}"
                           " s drain timeout before this request finished; retry",
                           code="drain_timeout", headers=[(b"retry-after", b"1")])
        if not client.started:
            await _send_error(send, err)
        elif client.sse and not client.finished:
            client.finished = True
            await send({"type": "http.response.body", "body": b"data: " + err.body() + b"\n\n",
                        "more_body": False})
        else:
            raise MidstreamFailure("drain timeout")  # a half-sent body: close the connection

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise GatewayError(413, f"request body exceeds {limit} bytes",
                                   code="body_too_large")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise GatewayError(413, f"request body exceeds {limit} bytes",
                                   code="body_too_large")
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _authenticate(self, scope: Scope) -> KeyInfo | None:
        if self.keys is None:
            return None
        auth = next((v.decode("latin-1") for k, v in scope["headers"]
                     if k == b"authorization"), None)
        info = self.keys.verify(auth)
        if info is None:
            raise GatewayError(401, "missing or invalid API key; send 'Authorization: Bearer "
                               "<key>'", type_="authentication_error", code="invalid_api_key")
        return info

    def _rate_limit(self, who: KeyInfo | None, scope: Scope, tokens: int) -> None:
        d = self.config.default_limits
        if who is not None:
            limits = Limits(rpm=d.rpm if who.rpm is None else who.rpm,
                            tpm=d.tpm if who.tpm is None else who.tpm)
            client = "key:" + who.name
        else:
            limits = d
            client = "addr:" + (scope.get("client") or ("?",))[0]
        if limits.rpm <= 0 and limits.tpm <= 0:
            return
        verdict = self.limiter.check(client, limits, tokens, time.monotonic())
        if verdict.allowed:
            return
        if verdict.retry_after_s == float("inf"):
            raise GatewayError(400, f"this request's ~{tokens} tokens exceed the {limits.tpm} "
                               "tokens/min limit by themselves; lower max_tokens",
                               param="max_tokens", code="exceeds_token_limit")
        retry = max(1, int(verdict.retry_after_s + 0.999))
        what = "requests" if verdict.limit == "rpm" else "tokens"
        raise GatewayError(429, f"rate limit of {what} per minute reached; retry in {retry} s",
                           type_=what, code="rate_limit_exceeded",
                           headers=[(b"retry-after", str(retry).encode())])

    # -- plain endpoints -----------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        if self.keys is not None:
            info = self.keys.verify(request.headers.get("authorization"))
            if info is None:
                err = GatewayError(401, "missing or invalid API key",
                                   type_="authentication_error", code="invalid_api_key")
                return Response(err.body(), 401, media_type="application/json")
        return JSONResponse({"object": "list", "data": self.lanes.model_cards()})

    async def _health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining", "tier": self.replicas.tier,
                                 "in_flight": len(self._active)}, status_code=503)
        ready = {lane.name: lane.replicas.ready_count() for lane in self.lanes}
        ok = sum(ready.values()) > 0 or self.replicas.on_demand is not None
        return JSONResponse({"status": "ok" if ok else "no_ready_replica", "tier":
                             self.replicas.tier, "ready_replicas": sum(ready.values()),
                             "replicas": sum(len(lane.replicas.replicas) for lane in self.lanes),
                             "tiers": ready},
                            status_code=200 if ok else 503)

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def _openapi(self, request: Request) -> Response:
        return JSONResponse(_OPENAPI)


class _ClientGone(Exception):
    """The client disconnected while sending its request."""


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any],
                            client: ClientState) -> None:
    """Cancel the forwarding task when the client goes away before the answer ends."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not client.finished:
                client.disconnected = True
                task.cancel()
            return


async def _send_error(send: Send, err: GatewayError) -> None:
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), *err.headers]})
    await send({"type": "http.response.body", "body": err.body(), "more_body": False})


# The gateway's routes described with the engine's request models (what it forwards), so
# that clients and fuzzers see one API.
_OPENAPI = openapi_document("strata gateway", [
    ("POST", "/v1/completions", CompletionRequest, "OpenAI completions, routed to a replica"),
    ("POST", "/v1/chat/completions", ChatCompletionRequest, "OpenAI chat completions, routed"),
    ("GET", "/v1/models", None, "Models served by the replicas"),
    ("GET", "/health", None, "Whether a replica is ready"),
    ("GET", "/metrics", None, "Prometheus metrics"),
])


def create_app(config: GatewayConfig, on_demand: OnDemand | None = None) -> Gateway:
    """The gateway as an ASGI app (serve it with uvicorn; lifespan must be on)."""
    return Gateway(config, on_demand)
