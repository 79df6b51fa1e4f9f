"""A fast, deterministic OpenAI-compatible streaming server: a test and benchmark FIXTURE.

It is not an inference engine. It answers the OpenAI completions and chat-completions APIs
with made-up tokens on a fixed timetable (time to first token, then one token per
inter-token delay), so that load generators, the gateway and the autoscaler can be
exercised and measured over real HTTP without a model. Several can run as separate
processes to stand in for a fleet of replicas::

    python -m strata.bench.fake_backend --port 8101 --ttft-ms 50 --itl-ms 10

Behaviour, chosen to look like vLLM to a client:

- ``--output-tokens N`` is the *natural* answer length (where a model would emit EOS).
  A request gets ``min(N, max_tokens)`` tokens with ``finish_reason`` ``stop`` or
  ``length``; with ``ignore_eos: true`` it gets exactly ``max_tokens`` tokens, unless
  ``--no-ignore-eos`` makes it behave like a server that does not know that extension.
- ``usage.prompt_tokens`` is exact for token-id prompts and a whitespace word count for text
  (the fixture has no tokenizer).
- ``/metrics`` is Prometheus text: running requests, totals, and a
  ``strata_tier_replicas{tier=...}`` gauge of 1 so replica scraping can be tested.

It is a raw ASGI app (no framework routing) under uvicorn, so one process streams thousands
of tokens per second without becoming the bottleneck of the system it stands in front of.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# OpenAI's documented default for /v1/completions when max_tokens is omitted.
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class FakeBackendConfig:
    """Timing and behaviour of one fake replica."""

    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    output_tokens: int = 64
    prefill_us_per_token: float = 0.0
    honour_ignore_eos: bool = True
    model: str = "strata-fake"
    tier: str = "engine"


class _HTTPError(Exception):
    """An error to answer in the OpenAI error format."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def _error_body(status: int, message: str, param: str | None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}
    ).encode()


def _token_text(index: int) -> str:
    # Short distinct words; a client counting chunks sees exactly one token per chunk.
    return f" t{index}"


def _count_prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, list):
        return len(prompt)
    return len(str(prompt).split())


class FakeBackend:
    """ASGI application implementing the fixture's endpoints."""

    def __init__(self, config: FakeBackendConfig) -> None:
        """Create the app with its own Prometheus registry (several may share a process)."""
        self.config = config
        self.registry = CollectorRegistry()
        self._running = Gauge(
            "strata_fake_requests_running", "Requests being streamed now.",
            registry=self.registry,
        )
        self._requests = Counter(
            "strata_fake_requests", "Generation requests received.", registry=self.registry
        )
        self._output_tokens = Counter(
            "strata_fake_output_tokens", "Output tokens sent.", registry=self.registry
        )
        replicas = Gauge(
            "strata_tier_replicas", "Replicas per tier (always 1 for a lone fixture).",
            ["tier"], registry=self.registry,
        )
        replicas.labels(tier=config.tier).set(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch one ASGI connection scope."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except _HTTPError as err:
            await _send_bytes(send, err.status, _error_body(err.status, err.message, err.param))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path in ("/health", "/v1/models", "/metrics"):
            if method != "GET":
                raise _HTTPError(405, f"{path} accepts GET only")
            if path == "/health":
                await _send_bytes(send, 200, b'{"status":"ok"}')
            elif path == "/v1/models":
                body = {
                    "object": "list",
                    "data": [{"id": self.config.model, "object": "model", "created": 0,
                              "owned_by": "strata-fake"}],
                }
                await _send_bytes(send, 200, json.dumps(body).encode())
            else:
                await _send_bytes(send, 200, generate_latest(self.registry),
                                  CONTENT_TYPE_LATEST.encode())
            return
        if path in ("/v1/completions", "/v1/chat/completions"):
            if method != "POST":
                raise _HTTPError(405, f"{path} accepts POST only")
            body = await _read_json(receive)
            await self._generate(body, path == "/v1/chat/completions", receive, send)
            return
        raise _HTTPError(404, f"no route {path}; try /v1/completions or /v1/chat/completions")

    def _plan(self, body: dict[str, Any], chat: bool) -> tuple[int, int, str]:
        """Validate a request and decide (prompt_tokens, output_tokens, finish_reason)."""
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _HTTPError(400, "'messages' must be a non-empty list", "messages")
            prompt_tokens = sum(_count_prompt_tokens(m.get("content", "")) for m in messages
                                if isinstance(m, dict))
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            default_max = self.config.output_tokens
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            valid_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
            if not (isinstance(prompt, str) or valid_ids):
                raise _HTTPError(400, "'prompt' must be a string or a list of token ids",
                                 "prompt")
            prompt_tokens = _count_prompt_tokens(prompt)
            max_tokens = body.get("max_tokens")
            default_max = _COMPLETIONS_DEFAULT_MAX_TOKENS
        if body.get("n", 1) != 1:
            raise _HTTPError(400, "this fixture supports n=1 only", "n")
        if max_tokens is None:
            max_tokens = default_max
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise _HTTPError(400, "'max_tokens' must be a positive integer", "max_tokens")
        ignore_eos = bool(body.get("ignore_eos")) and self.config.honour_ignore_eos
        if ignore_eos or self.config.output_tokens >= max_tokens:
            return prompt_tokens, max_tokens, "length"
        return prompt_tokens, self.config.output_tokens, "stop"

    async def _generate(self, body: dict[str, Any], chat: bool, receive: Receive,
                        send: Send) -> None:
        prompt_tokens, n_out, finish = self._plan(body, chat)
        self._requests.inc()
        start = time.perf_counter()
        first_at = (start + self.config.ttft_ms / 1000.0
                    + prompt_tokens * self.config.prefill_us_per_token / 1e6)
        itl_s = self.config.itl_ms / 1000.0
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out,
                 "total_tokens": prompt_tokens + n_out}
        self._running.inc()
        try:
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                await self._stream(chat, rid, created, n_out, finish, usage if include_usage
                                   else None, first_at, itl_s, receive, send)
            else:
                await _sleep_until(first_at + max(n_out - 1, 0) * itl_s)
                text = "".join(_token_text(i) for i in range(n_out))
                if chat:
                    choice: dict[str, Any] = {
                        "index": 0, "message": {"role": "assistant", "content": text},
                        "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": text, "logprobs": None,
                              "finish_reason": finish}
                out = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                       "created": created, "model": self.config.model, "choices": [choice],
                       "usage": usage}
                self._output_tokens.inc(n_out)
                await _send_bytes(send, 200, json.dumps(out).encode())
        finally:
            self._running.dec()

    async def _stream(self, chat: bool, rid: str, created: int, n_out: int, finish: str,
                      usage: dict[str, int] | None, first_at: float, itl_s: float,
                      receive: Receive, send: Send) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        model = self.config.model

        def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
            payload = {"id": rid, "object": obj, "created": created, "model": model,
                       "choices": choices}
            if extra:
                payload.update(extra)
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        def token_choice(text: str | None, reason: str | None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, disconnected))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
            for i in range(n_out):
                await _sleep_until(first_at + i * itl_s)
                if disconnected.is_set():
                    return
                data = b""
                if chat and i == 0:
                    data = chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None}])
                last = i == n_out - 1
                data += chunk([token_choice(_token_text(i), finish if last and not chat
                                            else None)])
                if last and chat:
                    data += chunk([token_choice(None, finish)])
                self._output_tokens.inc()
                await send({"type": "http.response.body", "body": data, "more_body": True})
            tail = b""
            if usage is not None:
                tail += chunk([], {"usage": usage})
            tail += b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            watcher.cancel()


async def _watch_disconnect(receive: Receive, flag: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            flag.set()
            return


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def _read_json(receive: Receive) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _HTTPError(400, "client disconnected before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY_BYTES:
            raise _HTTPError(413, f"request body exceeds {_MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except json.JSONDecodeError as err:
        raise _HTTPError(400, f"request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise _HTTPError(400, "request body must be a JSON object")
    return body


async def _send_bytes(send: Send, status: int, body: bytes,
                      content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def serve(config: FakeBackendConfig, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Run one fake replica in the foreground until interrupted."""
    uvicorn.run(FakeBackend(config), host=host, port=port, log_level="warning",
                access_log=False, lifespan="on")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m strata.bench.fake_backend",
        description="Deterministic fake OpenAI-compatible streaming server (test fixture).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--ttft-ms", type=float, default=20.0,
                        help="delay from request to first token")
    parser.add_argument("--itl-ms", type=float, default=5.0, help="delay between tokens")
    parser.add_argument("--output-tokens", type=int, default=64,
                        help="natural answer length (EOS point); max_tokens caps it")
    parser.add_argument("--prefill-us-per-token", type=float, default=0.0,
                        help="extra TTFT per prompt token, to mimic prefill cost")
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="ignore the ignore_eos extension, like a server without it")
    parser.add_argument("--model", default="strata-fake")
    parser.add_argument("--tier", default="engine", help="label of the replicas gauge")
    args = parser.parse_args(argv)
    if args.output_tokens < 1:
        parser.error("--output-tokens must be >= 1")
    if args.ttft_ms < 0 or args.itl_ms < 0 or args.prefill_us_per_token < 0:
        parser.error("--ttft-ms, --itl-ms and --prefill-us-per-token must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m strata.bench.fake_backend``."""
    args = _parse_args(argv)
    config = FakeBackendConfig(
        ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, output_tokens=args.output_tokens,
        prefill_us_per_token=args.prefill_us_per_token,
        honour_ignore_eos=not args.no_ignore_eos, model=args.model, tier=args.tier)
    serve(config, args.host, args.port)


if __name__ == "__main__":
    main()
