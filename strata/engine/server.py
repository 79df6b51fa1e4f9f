"""HTTP face of one engine replica: OpenAI API, /health, /metrics, /load.

Every failure a client can cause becomes an OpenAI-format 4xx; the engine thread
never sees an invalid request, and a client that goes away aborts its sequences
(freeing their KV blocks) through the async generator's cleanup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from pydantic import BaseModel, ValidationError

from strata.engine.core import RequestError, SequenceFailed
from strata.engine.engine import AsyncEngine
from strata.engine.lora_routes import add_lora_routes, lora_cards
from strata.engine.metrics import EngineMetrics
from strata.engine.serving import Serving
from strata.engine.tool_calls import ToolConfig
from strata.internal_auth import admin_denial
from strata.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    OpenAIError,
    RequestLimits,
    TokenizeRequest,
    error_body,
    openapi_components,
    openapi_request_body,
    parse_json_body,
    sse,
    validation_error,
)

log = logging.getLogger("strata.server")

async def _timed(
    gen: AsyncIterator[bytes], metrics: EngineMetrics, model: str, t0: float
) -> AsyncIterator[bytes]:
    """Pass SSE frames through while observing TTFT/TPOT/E2E."""
    first: float | None = None
    n = 0
    finished = False
    try:
        try:
            async for frame in gen:
                if first is None and n == 0:
                    first = time.perf_counter()
                    metrics.ttft.labels(model).observe(first - t0)
                n += 1
                yield frame
            finished = True
        except OpenAIError as e:
            # Headers are sent: the only way left to tell the client is an error event.
            yield sse(e.body())
        except RequestError as e:
            yield sse(error_body(str(e), "BadRequestError", e.param, 400))
        except SequenceFailed as e:  # logged by the engine core
            yield sse(error_body(str(e), "InternalServerError", None, 500))
        except Exception as e:  # noqa: BLE001 - reported to the client, logged here
            log.exception("stream failed")
            yield sse(error_body(f"generation failed: {e}", "InternalServerError", None, 500))
    finally:
        end = time.perf_counter()
        metrics.e2e.labels(model).observe(end - t0)
        if first is not None and n > 2:
            metrics.tpot.labels(model).observe((end - first) / (n - 2))
        metrics.requests.labels(model, "completed" if finished else "abort").inc()


def _error(e: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if isinstance(e, RetryElsewhere) else None
    return JSONResponse(e.body(), status_code=e.status_code, headers=headers)


class RetryElsewhere(OpenAIError):
    """503 + Retry-After: this replica will not answer the request (not started, or handed
    back at the drain timeout with nothing sent), so another replica may."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, 503, "ServiceUnavailable", code=code)


class Drainer:
    """A replica's graceful stop: refuse new requests, let in-flight ones finish, end the rest.

    Draining starts at ``POST /drain`` or SIGTERM, whichever comes first, and the timeout
    counts from then, so a platform that drained a replica and then signals it does not
    wait twice. Past ``timeout_s`` the remaining sequences are ended with a 503 (an SSE
    error event on a stream), their KV blocks freed.
    """

    def __init__(self, engine: AsyncEngine, timeout_s: float = 120.0) -> None:
        """``timeout_s`` should be at least the longest request this replica allows."""
        if timeout_s < 0:
            raise ValueError("drain timeout must be >= 0")
        self.engine = engine
        self.timeout_s = timeout_s
        self.started_at: float | None = None

    def begin(self) -> None:
        """Refuse new requests from now on (idempotent; the first call starts the clock)."""
        if self.started_at is None:
            self.started_at = time.monotonic()
        self.engine.core.draining = True

    @property
    def busy(self) -> bool:
        """Sequences are scheduled, or a consumer still reads one."""
        return self.engine.core.scheduler.num_unfinished > 0 or self.engine.active > 0

    def run(self, poll_s: float = 0.05) -> int:
        """Drain to the end (blocking, any thread); how many sequences had to be ended."""
        self.begin()
        assert self.started_at is not None
        deadline = self.started_at + self.timeout_s
        while self.busy and time.monotonic() < deadline:
            time.sleep(poll_s)
        if not self.busy:
            return 0
        ended = self.engine.abort_all(RetryElsewhere(
            f"this replica stopped: its {self.timeout_s:g} s drain timeout passed before the "
            "request finished; retry", "drain_timeout"))
        log.warning("drain timeout (%g s): ended %d sequence(s)", self.timeout_s, ended)
        flush = time.monotonic() + 2.0  # let the handlers send those errors
        while self.engine.active and time.monotonic() < flush:
            time.sleep(poll_s)
        return ended


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, counted while it arrives: a 413 as soon as it passes `limit`, never after."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise OpenAIError(
            f"request body of {declared} bytes exceeds this server's {limit}; send a smaller "
            "request", 413, "RequestTooLarge", code="body_too_large",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(
                f"request body exceeds this server's {limit} bytes; send a smaller request",
                413, "RequestTooLarge", code="body_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _json(request: Request, limits: RequestLimits) -> dict[str, Any]:
    return parse_json_body(await _read_body(request, limits.max_body_bytes), limits.max_json_depth)


async def _parse(request: Request, model: type[BaseModel], limits: RequestLimits) -> Any:
    data = await _json(request, limits)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


async def _until_disconnect(request: Request, coro: Any) -> Any:
    """Await coro, cancelling it (and so aborting its sequences) if the client leaves."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise OpenAIError("client disconnected", 499, "ClientClosedRequest")


def build_app(
    engine: AsyncEngine,
    ready: Callable[[], bool] | None = None,
    limits: RequestLimits | None = None,
    internal_token: str | None = None,
    drainer: Drainer | None = None,
    tools: ToolConfig | None = None,
) -> FastAPI:
    """The FastAPI app of one replica.

    Admin endpoints (`/drain`) want `internal_token` in the `x-strata-internal-token`
    header; with no token they answer loopback clients only. ``drainer`` runs the
    graceful stop (`POST /drain` starts it; the process's SIGTERM handler finishes it).
    """
    core = engine.core
    drainer = drainer or Drainer(engine)
    limits = limits or RequestLimits()
    serving = Serving(engine, core.tokenizer, core.model_name, limits, tools)
    metrics = EngineMetrics(core)
    model = core.model_name
    app = FastAPI(title="strata engine", docs_url=None, redoc_url=None)
    _describe_request_bodies(app)
    is_ready = ready or (lambda: True)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        metrics.errors.labels(model, str(e.status_code)).inc()
        return _error(e)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        metrics.errors.labels(model, "400").inc()
        return JSONResponse(error_body(str(e), "BadRequestError", e.param, 400), 400)

    @app.exception_handler(SequenceFailed)
    async def _sequence_failed(_: Request, e: SequenceFailed) -> JSONResponse:
        metrics.errors.labels(model, "500").inc()  # logged by the engine core
        return JSONResponse(error_body(str(e), "InternalServerError", None, 500), 500)

    @app.exception_handler(404)
    async def _not_found(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"no route {request.url.path}", "NotFoundError", None, 404), 404
        )

    @app.exception_handler(405)
    async def _bad_method(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"method {request.method} not allowed on {request.url.path}", "MethodNotAllowed", None, 405),
            405,
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_body(f"internal error: {e}", "InternalServerError", None, 500), 500)

    def admit() -> None:
        # 503 + Retry-After: the request was not started, so a gateway may send it elsewhere.
        if core.draining:
            raise RetryElsewhere("this replica is draining; retry on another", "draining")
        if engine.dead is not None:
            raise RetryElsewhere("the engine loop has died; retry on another replica", "engine_dead")

    @app.post("/v1/completions", openapi_extra=openapi_request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        t0 = time.perf_counter()
        admit()
        req: CompletionRequest = await _parse(request, CompletionRequest, limits)
        if req.stream:
            prepared = serving.prepare_completion(req)
            gen = _timed(serving.completion_stream(req, prepared), metrics, model, t0)
            return StreamingResponse(gen, media_type="text/event-stream")
        body = await _until_disconnect(request, serving.completion(req))
        _observe_whole(metrics, model, t0, body)
        return JSONResponse(body)

    @app.post("/v1/chat/completions", openapi_extra=openapi_request_body(ChatCompletionRequest))
    async def chat(request: Request) -> Response:
        t0 = time.perf_counter()
        admit()
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest, limits)
        if req.stream:
            prepared = serving.prepare_chat(req)
            gen = _timed(serving.chat_stream(req, prepared), metrics, model, t0)
            return StreamingResponse(gen, media_type="text/event-stream")
        body = await _until_disconnect(request, serving.chat(req))
        _observe_whole(metrics, model, t0, body)
        return JSONResponse(body)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = ModelCard(id=model, root=model, max_model_len=core.config.max_model_len)
        return {"object": "list", "data": [card.model_dump(), *lora_cards(core, model)]}

    if getattr(core.runner, "loras", None) is not None:
        add_lora_routes(app, core, lambda r: _json(r, limits), internal_token)

    @app.post("/tokenize", openapi_extra=openapi_request_body(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        data = await _json(request, limits)
        if "messages" in data:
            try:
                req = ChatCompletionRequest.model_validate({**data, "max_tokens": 1})
            except ValidationError as e:
                raise validation_error(e) from None
            ids, _, _ = serving.prepare_chat(req)
        elif isinstance(data.get("prompt"), str):
            special = data.get("add_special_tokens", True)  # vLLM's default for a prompt
            if not isinstance(special, bool):
                raise OpenAIError("add_special_tokens must be a boolean", param="add_special_tokens")
            ids = core.tokenizer.encode(data["prompt"], add_special_tokens=special)
        else:
            raise OpenAIError("tokenize needs a string `prompt` or `messages`", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": core.config.max_model_len}

    @app.post("/detokenize", openapi_extra=openapi_request_body(DetokenizeRequest))
    async def detokenize(request: Request) -> dict[str, Any]:
        data = await _json(request, limits)
        ids = data.get("tokens")
        vocab = core.tokenizer.vocab_size
        if not isinstance(ids, list) or not all(
            type(t) is int and 0 <= t < vocab for t in ids
        ):
            raise OpenAIError(
                f"detokenize needs `tokens`, a list of token ids in [0, {vocab})", param="tokens"
            )
        return {"prompt": core.tokenizer.decode(ids)}

    @app.get("/health")
    async def health() -> Response:
        if engine.dead is not None:
            return JSONResponse({"status": "dead", "error": str(engine.dead)}, 503)
        if core.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not is_ready():
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/load")
    async def load() -> dict[str, Any]:
        return core.load_report(ready=is_ready() and engine.dead is None).to_dict()

    @app.post("/drain")
    async def drain(request: Request) -> Any:
        denied = admin_denial(request, internal_token)
        if denied is not None:
            return denied
        drainer.begin()
        return {"status": "draining", "unfinished": core.scheduler.num_unfinished}

    @app.get("/internal/prefix")
    async def prefix(request: Request, epoch: str | None = None, since: int | None = None) -> Any:
        # Routing keys the prefix cache holds (strata.prefix_report); internal: they say
        # which prompts were sent recently.
        denied = admin_denial(request, internal_token)
        if denied is not None:
            return denied
        if core.prefixes is None:
            raise OpenAIError("this replica has no prefix cache to report", 404, "NotFoundError")
        return core.prefixes.report(epoch, since).to_dict()

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    return app


def _describe_request_bodies(app: FastAPI) -> None:
    """Add the request models' schemas to /openapi.json.

    The routes read and validate their bodies themselves (size counted while reading,
    OpenAI-format errors), so FastAPI cannot see the models; the generation routes name
    them through openapi_extra and the schemas are merged in here.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            doc.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components())
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _observe_whole(metrics: EngineMetrics, model: str, t0: float, body: dict[str, Any]) -> None:
    dt = time.perf_counter() - t0
    metrics.e2e.labels(model).observe(dt)
    for c in body.get("choices", []):
        metrics.requests.labels(model, c.get("finish_reason") or "unknown").inc()
