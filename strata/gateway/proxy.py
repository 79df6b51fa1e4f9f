"""The streaming proxy: route, send upstream, pass the bytes through.

Retries (Envoy's ``connect-failure`` plus "503 when the upstream says it did not start"):
a request moves to another replica (up to ``max_retries``) only when it never reached the
replica (the connection could not be opened) or the replica answered 429/503 with
Retry-After, its way of saying "not started" (admission full, draining). Once a request has
reached a replica it is never run a second time elsewhere: a 4xx from the replica goes to
the client verbatim and says nothing about the replica; a 5xx goes to the client too and
counts toward the replica's ejection (consecutive faults); a connection lost after the
request was sent is a fault, answered 502 (504 for a timeout).

Silence is not failure: a non-streaming answer is silent until it is done, so the upstream
fails a silent request only when its replica also stops answering probes (see
strata.gateway.upstream); ``request_timeout_s`` is the operator's hard cap.

After the first byte the upstream's chunks are forwarded as they come (no
re-serialisation, no buffering); a replica that fails mid-stream ends an SSE stream with an
OpenAI-style error event. A client that disconnects cancels the forwarding task, which
closes the upstream connection, which is how the replica learns to abort the request and
free its KV blocks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from strata.gateway.admission import ModelQueue, QueueFull
from strata.gateway.demand import DemandTracker
from strata.gateway.metrics import GatewayMetrics
from strata.gateway.replica_set import Replica, ReplicaSet
from strata.gateway.upstream import (
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from strata.routing.policies import Policy
from strata.routing.types import RouteRequest

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer",
                         b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"date",
                         b"server"})


class GatewayError(Exception):
    """An error the gateway answers itself, in the OpenAI error format."""

    def __init__(self, status: int, message: str, *, type_: str | None = None,
                 code: str | None = None, param: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.param = param
        self.headers = headers or []

    def body(self) -> bytes:
        """The JSON error body."""
        return json.dumps({"error": {"message": self.message, "type": self.type,
                                     "param": self.param, "code": self.code}}).encode()


def model_not_found(model: str) -> GatewayError:
    """vLLM's answer for a model nobody serves, in the OpenAI error format."""
    return GatewayError(404, f"The model `{model}` does not exist.", type_="NotFoundError",
                        code="model_not_found", param="model")


class MidstreamFailure(Exception):
    """A replica failed after the response started and it cannot be repaired."""


class UpstreamFailure(Exception):
    """One attempt on one replica that produced no response to pass on.

    ``started`` is False only when the replica certainly did not start the request (never
    sent, or an explicit "not started" answer): only then may it be re-sent elsewhere.
    ``fault`` says whether it counts toward the replica's ejection.
    """

    def __init__(self, kind: str, detail: str, *, started: bool, fault: bool,
                 refused: bool = False, status: int | None = None,
                 retry_after: bytes | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.started = started
        self.fault = fault
        self.refused = refused
        self.status = status
        self.retry_after = retry_after


class ClientState:
    """What the disconnect watcher and the proxy share about one client connection."""

    __slots__ = ("finished", "disconnected", "started", "sse")

    def __init__(self) -> None:
        self.finished = False  # the last message is being sent: a disconnect now is normal
        self.disconnected = False  # the client left before that
        self.started = False  # the response head was sent
        self.sse = False  # ... and it is an event stream


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Retry and hold behaviour."""

    max_retries: int = 2
    hold_timeout_s: float = 30.0  # longest wait for a ready replica (activation included)
    replica_header: bool = True  # add x-strata-replica to responses

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.hold_timeout_s < 0:
            raise ValueError("max_retries and hold_timeout_s must be >= 0")


class Proxy:
    """Routes one parsed request and streams its response."""

    def __init__(self, replicas: ReplicaSet, policy: Policy, metrics: GatewayMetrics,
                 config: ProxyConfig, demand: DemandTracker) -> None:
        """Wire the parts; the proxy owns only the decision counter."""
        self.replicas = replicas
        self.policy = policy
        self.metrics = metrics
        self.config = config
        self.demand = demand
        self._seq = 0

    def choose_now(self, route: RouteRequest, tried: set[str]) -> tuple[Replica | None, bool]:
        """One routing decision: (replica or None, whether any candidate existed)."""
        t = time.perf_counter()
        self._seq += 1
        snap = self.replicas.snapshot(route, self._seq, self.demand.current(time.monotonic()),
                                      tried)
        chosen = self.policy.pick(route, snap)
        self.metrics.decision.observe(time.perf_counter() - t)
        if chosen is not None:
            return self.replicas.replicas.get(chosen.url), True
        return None, bool(snap.candidates(route))

    async def choose(self, route: RouteRequest, tried: set[str], queue: ModelQueue) -> Replica | None:
        """A replica for the request; holds (bounded) while none is ready for its model.

        None means every candidate was tried already. While no replica of the tier is ready
        the activator is asked for one.
        """
        replica, had_candidates = self.choose_now(route, tried)
        if replica is not None or tried:
            return replica
        if had_candidates:
            raise GatewayError(400, f"prompt and max_tokens (about {route.total_tokens} tokens)"
                               " exceed the KV cache of every replica; shorten the prompt or "
                               "lower max_tokens", param="max_tokens")
        self._check_model_exists(route.model)
        try:
            queue.enter_waiting()
        except QueueFull as err:
            raise GatewayError(503, str(err), code="queue_full",
                               headers=[(b"retry-after", b"1")]) from None
        label = self.replicas.model_label(route.model)
        self.metrics.queued.labels(model=label).inc()
        deadline = time.monotonic() + self.config.hold_timeout_s
        try:
            while True:
                activation = None
                if self.replicas.ready_count() == 0:
                    activation = self.replicas.activate()
                if activation is not None and activation.done() and not activation.cancelled():
                    exc = activation.exception()
                    if exc is not None and self.replicas.ready_count() == 0:
                        raise GatewayError(
                            503, f"activating tier {self.replicas.tier!r} failed: {exc}",
                            code="activation_failed", headers=[(b"retry-after", b"5")])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayError(
                        503, f"no replica of tier {self.replicas.tier!r} became ready for "
                        f"model {route.model!r} within {self.config.hold_timeout_s:g} s",
                        code="no_ready_replica", headers=[(b"retry-after", b"5")])
                await self.replicas.wait_changed(min(remaining, 1.0))
                replica, had_candidates = self.choose_now(route, tried)
                if replica is not None:
                    return replica
                if had_candidates:
                    raise GatewayError(400, "prompt and max_tokens exceed the KV cache of "
                                       "every replica", param="max_tokens")
                self._check_model_exists(route.model)
        finally:
            queue.leave_waiting()
            self.metrics.queued.labels(model=label).dec()

    def _check_model_exists(self, model: str) -> None:
        """404 when ``model`` is neither configured nor served by a replica that says what it serves.

        With no replica's list known yet, the configured names decide (when there are any),
        so a request for another model is refused at once instead of held.
        """
        rs = list(self.replicas.replicas.values())
        configured = self.replicas.served_models
        if not model or model in configured or any(model in r.models for r in rs):
            return
        known = bool(rs) and all(r.models for r in rs)
        if known or (configured and not any(r.models for r in rs)):
            raise model_not_found(model)

    async def open(self, replica: Replica, path: str, body: bytes
                   ) -> tuple[UpstreamResponse, bytes]:
        """Send the request and wait for the first body bytes; UpstreamFailure otherwise.

        Any status the replica answers is returned for passing on, except 429/503 with
        Retry-After, which says the request was not started (UpstreamFailure, retriable).
        """
        try:
            resp = await replica.pool.post(path, body, replica.extra_headers)
        except UpstreamUnreachable as err:
            raise UpstreamFailure("connect", str(err), started=False, fault=True,
                                  refused=err.refused) from None
        except UpstreamTimeout as err:
            raise UpstreamFailure("timeout", str(err), started=True,
                                  fault=not err.capped) from None
        except UpstreamError as err:
            raise UpstreamFailure("reset", str(err), started=True, fault=True) from None
        try:
            if resp.status in (429, 503):
                retry_after = next((v for k, v in resp.headers if k == b"retry-after"), None)
                if retry_after is not None:
                    detail = (await resp.read_all(2048)).decode(errors="replace")
                    resp.release()
                    raise UpstreamFailure(f"http_{resp.status}", detail, started=False,
                                          fault=False, status=resp.status,
                                          retry_after=retry_after)
            first = await resp.read()
            if not first and resp.status < 400:
                raise UpstreamFailure("empty", "replica ended the response without a byte",
                                      started=True, fault=True)
            return resp, first
        except UpstreamTimeout as err:
            resp.close()
            raise UpstreamFailure("timeout", str(err), started=True,
                                  fault=not err.capped) from None
        except UpstreamError as err:
            resp.close()
            raise UpstreamFailure("reset", str(err), started=True, fault=True) from None
        except BaseException:
            resp.close()
            raise

    def _response_headers(self, resp: UpstreamResponse, replica: Replica
                          ) -> list[tuple[bytes, bytes]]:
        headers = [(k, v) for k, v in resp.headers if k not in _HOP_BY_HOP]
        if self.config.replica_header:
            headers.append((b"x-strata-replica", replica.url_bytes))
        return headers

    async def forward(self, send: Send, path: str, body: bytes, route: RouteRequest,
                      queue: ModelQueue, t0: float, client: ClientState) -> None:
        """Route with retries and stream the response; GatewayError if it never started.

        ``client.finished`` is set just before the last message, so a disconnect watcher
        can tell a client that left from one that was answered.
        """
        self.demand.observe(route, time.monotonic())
        tried: set[str] = set()
        last: UpstreamFailure | None = None
        for attempt in range(1 + self.config.max_retries):
            replica = await self.choose(route, tried, queue)
            if replica is None:
                break
            if attempt:
                self.metrics.retries.inc()
            ticket = replica.begin(route, time.monotonic())
            self.metrics.routed_to(replica.url)
            try:
                resp, first = await self.open(replica, path, body)
            except UpstreamFailure as failure:
                replica.end(ticket, time.monotonic(), completed=False)
                if failure.fault:
                    self.replicas.note_failure(replica, failure.refused, failure.kind)
                else:
                    self.replicas.note_not_started(replica, failure.kind)
                if failure.started:
                    raise self._failed(failure) from None  # it ran there: never run it twice
                tried.add(replica.url)
                last = failure
                continue
            except BaseException:
                replica.end(ticket, time.monotonic(), completed=False)
                raise
            replica.first_byte(ticket)
            await self._stream(send, resp, first, replica, ticket, route, t0, client)
            return
        raise self._exhausted(last, len(tried))

    async def _stream(self, send: Send, resp: UpstreamResponse, first: bytes,
                      replica: Replica, ticket: int, route: RouteRequest, t0: float,
                      client: ClientState) -> None:
        clean = False
        try:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": self._response_headers(resp, replica)})
            client.started = True
            client.sse = resp.content_type == b"text/event-stream"
            # The body's last bytes go out with the end marker: one write fewer per request.
            last = resp.at_eof
            if last:
                client.finished = True
            await send({"type": "http.response.body", "body": first, "more_body": not last})
            if resp.status < 400:
                self.metrics.observe_ttft(self.replicas.model_label(route.model), time.perf_counter() - t0)
                replica.record_success()
            elif resp.status >= 500:
                # Passed on as it is, never retried (the replica ran it); it counts as a fault.
                self.replicas.note_failure(replica, False, f"http_{resp.status}")
            read = resp.read
            try:
                while not last:
                    chunk = await read()
                    last = resp.at_eof
                    if last:
                        client.finished = True
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": not last})
                clean = True
            except UpstreamError as err:
                capped = isinstance(err, UpstreamTimeout) and err.capped
                if not capped:
                    self.replicas.note_failure(replica, False, "midstream")
                if resp.content_type != b"text/event-stream":
                    raise MidstreamFailure(str(err)) from None  # abort: a truncated body
                error = GatewayError(504, f"request stopped: {err}", code="request_timeout") \
                    if capped else GatewayError(502, f"replica failed mid-stream: {err}")
                client.finished = True
                await send({"type": "http.response.body",
                            "body": b"data: " + error.body() + b"\n\n", "more_body": False})
            self.metrics.observe_e2e(self.replicas.model_label(route.model), time.perf_counter() - t0)
        finally:
            if clean:
                resp.release()  # keep-alive: the connection goes back to the pool
            else:
                resp.close()  # closing the upstream connection cancels the request there
            replica.end(ticket, time.monotonic(), completed=clean)

    def _failed(self, failure: UpstreamFailure) -> GatewayError:
        """The answer for a request that reached a replica and produced no response."""
        if failure.kind == "timeout":
            code = "request_timeout" if not failure.fault else "upstream_timeout"
            return GatewayError(504, f"the replica did not answer: {failure.detail[:300]}",
                                code=code)
        return GatewayError(502, f"the replica failed while handling the request "
                            f"({failure.kind}: {failure.detail[:300]}); it was not retried "
                            "because it may have started", code="upstream_error")

    def _exhausted(self, last: UpstreamFailure | None, tried: int) -> GatewayError:
        if last is None:
            return GatewayError(503, "no replica available", code="no_ready_replica",
                                headers=[(b"retry-after", b"1")])
        if last.retry_after is not None:
            status = last.status or 503
            return GatewayError(status, f"no replica could take the request ({tried} tried); "
                                f"last answer {last.kind}: {last.detail[:300]}",
                                type_="server_error", code="replicas_busy",
                                headers=[(b"retry-after", last.retry_after)])
        return GatewayError(502, f"request failed on {tried} replica(s); last error "
                            f"{last.kind}: {last.detail[:300]}", code="upstream_error",
                            headers=[(b"retry-after", b"1")])
