"""The load generator: streams OpenAI requests on a schedule and times every token.

Open loop (the default) sends each request at its scheduled time whether or not earlier
ones have finished, as real users do; the send time is recorded so the result shows when
the client itself fell behind. Closed loop keeps a fixed number of requests in flight.

The HTTP client is aiohttp rather than httpx: streaming the same load, it costs about
40 us of CPU per SSE chunk against httpx's 113 us (measured on this project's 2-core
machines), and a client that runs out of CPU delays chunks and inflates the very
latencies it measures.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from strata.bench.results import RequestRecord, Sample
from strata.bench.scrape import MetricsScraper


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: when, what prompt, how many tokens to ask for."""

    index: int
    scheduled_s: float
    prompt: str | list[int]
    prompt_tokens: int
    max_tokens: int
    prefix_blocks: int = 0


@dataclass(frozen=True)
class ClientOptions:
    """How to talk to the target."""

    target: str
    api: str = "completions"
    model: str = "default"
    ignore_eos: bool = True
    timeout_s: float = 600.0
    scrape_interval_s: float = 1.0


@dataclass
class RunOutput:
    """Records of a run plus the scraped metrics."""

    records: list[RequestRecord]
    timeseries: dict[str, list[Sample]] = field(default_factory=dict)
    scrape_errors: int = 0
    scrape_last_error: str | None = None


Hook = Callable[[RequestRecord], None]


def base_url(target: str) -> str:
    """Normalise a target URL: no trailing slash, no trailing /v1."""
    url = target.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--target must start with http:// or https://, got {target!r}")
    return url[:-3] if url.endswith("/v1") else url


def build_payload(spec: RequestSpec, options: ClientOptions) -> dict[str, Any]:
    """The JSON body for one request: streamed, with usage, max_tokens from the trace."""
    body: dict[str, Any] = {
        "model": options.model,
        "max_tokens": spec.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if options.ignore_eos:
        body["ignore_eos"] = True
    if options.api == "chat":
        if not isinstance(spec.prompt, str):
            raise ValueError("--api chat needs --prompt-format text")
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


def _error_message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:500]


def _chunk_text(event: dict[str, Any], chat: bool) -> str | None:
    choices = event.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    if chat:
        return (choice.get("delta") or {}).get("content")
    return choice.get("text")


async def send_request(session: aiohttp.ClientSession, spec: RequestSpec,
                       options: ClientOptions, t0: float, closed_loop: bool = False
                       ) -> RequestRecord:
    """Send one streamed request and time its first token, every chunk and its end."""
    chat = options.api == "chat"
    url = base_url(options.target) + ("/v1/chat/completions" if chat else "/v1/completions")
    payload = build_payload(spec, options)
    start = time.perf_counter()
    sent_s = start - t0
    base: dict[str, Any] = {
        "index": spec.index, "scheduled_s": sent_s if closed_loop else spec.scheduled_s,
        "sent_s": sent_s, "prompt_tokens": spec.prompt_tokens, "max_tokens": spec.max_tokens,
        "prefix_blocks": spec.prefix_blocks}
    chunk_times: list[float] = []
    finish: str | None = None
    usage: dict[str, Any] | None = None
    try:
        async with session.post(url, json=payload) as response:
            if response.status >= 400:
                raw = await response.read()
                return RequestRecord(**base, status="error", http_status=response.status,
                                     error=_error_message(raw),
                                     e2e_s=time.perf_counter() - start)
            pending = b""
            done = False
            async for data in response.content.iter_any():
                now = time.perf_counter() - start
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    body = line[5:].strip()
                    if body == b"[DONE]":
                        done = True
                        break
                    event = json.loads(body)
                    if "error" in event:
                        return RequestRecord(**base, status="error",
                                             http_status=response.status,
                                             error=str(event["error"])[:500],
                                             e2e_s=time.perf_counter() - start)
                    if event.get("usage"):
                        usage = event["usage"]
                    if _chunk_text(event, chat):
                        chunk_times.append(now)
                    for choice in event.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                if done:
                    break
    except TimeoutError as err:
        return RequestRecord(**base, status="timeout", error=f"timeout after "
                             f"{options.timeout_s:g} s: {err}", e2e_s=time.perf_counter() - start)
    except (aiohttp.ClientError, ValueError) as err:
        return RequestRecord(**base, status="error", error=f"{type(err).__name__}: {err}",
                             e2e_s=time.perf_counter() - start)
    e2e = time.perf_counter() - start
    if not chunk_times:
        return RequestRecord(**base, status="error", error="stream ended without a token",
                             e2e_s=e2e, finish_reason=finish)
    n_out = int(usage["completion_tokens"]) if usage and "completion_tokens" in usage \
        else len(chunk_times)
    ttft = chunk_times[0]
    return RequestRecord(
        **base, status="ok", http_status=200, ttft_s=ttft, e2e_s=e2e,
        tpot_s=(e2e - ttft) / (n_out - 1) if n_out > 1 else None,
        itl_s=[round(b - a, 6) for a, b in zip(chunk_times, chunk_times[1:], strict=False)],
        server_prompt_tokens=int(usage["prompt_tokens"]) if usage and
        "prompt_tokens" in usage else None,
        output_tokens=n_out, finish_reason=finish)


def make_client(options: ClientOptions) -> aiohttp.ClientSession:
    """An HTTP session with no connection cap: open-loop load must never queue in the client."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=options.timeout_s, sock_connect=30.0),
    )


async def _open_loop(client: aiohttp.ClientSession, specs: Sequence[RequestSpec],
                     options: ClientOptions, t0: float, on_done: Hook | None
                     ) -> list[RequestRecord]:
    async def one(spec: RequestSpec) -> RequestRecord:
        record = await send_request(client, spec, options, t0)
        if on_done:
            on_done(record)
        return record

    tasks: list[asyncio.Task[RequestRecord]] = []
    for spec in sorted(specs, key=lambda s: s.scheduled_s):
        delay = t0 + spec.scheduled_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(spec)))
    return list(await asyncio.gather(*tasks))


async def _closed_loop(client: aiohttp.ClientSession, specs: Sequence[RequestSpec],
                       options: ClientOptions, t0: float, concurrency: int,
                       on_done: Hook | None) -> list[RequestRecord]:
    pending = iter(specs)
    records: list[RequestRecord] = []

    async def worker() -> None:
        for spec in pending:  # one shared iterator: each spec goes to exactly one worker
            record = await send_request(client, spec, options, t0, closed_loop=True)
            records.append(record)
            if on_done:
                on_done(record)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(records, key=lambda r: r.index)


def raise_open_files_limit() -> None:
    """Lift the soft open-files limit to the hard one: each in-flight request is a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def run_load(specs: Sequence[RequestSpec], options: ClientOptions,
                   concurrency: int | None = None, on_done: Hook | None = None) -> RunOutput:
    """Run the whole load (open loop, or closed loop when ``concurrency`` is given)."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    raise_open_files_limit()
    async with make_client(options) as client:
        t0 = time.perf_counter()
        scraper = MetricsScraper(client, base_url(options.target) + "/metrics", t0,
                                 options.scrape_interval_s)
        scrape_task = asyncio.create_task(scraper.run())
        try:
            if concurrency is None:
                records = await _open_loop(client, specs, options, t0, on_done)
            else:
                records = await _closed_loop(client, specs, options, t0, concurrency, on_done)
        finally:
            scraper.stop()
            await scrape_task
    return RunOutput(records, scraper.series, scraper.errors, scraper.last_error)


async def discover_model(options: ClientOptions) -> str:
    """The first model the target lists at /v1/models, for requests that must name one."""
    url = base_url(options.target) + "/v1/models"
    try:
        async with make_client(options) as session, session.get(url) as response:
            response.raise_for_status()
            models = (await response.json()).get("data") or []
    except (aiohttp.ClientError, TimeoutError) as err:
        raise ValueError(f"cannot list models at {url} ({type(err).__name__}: {err}); "
                         "check --target, or pass --model NAME") from err
    if not models:
        raise ValueError(f"{options.target}/v1/models lists no model; pass --model")
    return str(models[0]["id"])
