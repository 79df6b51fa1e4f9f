"""Building a TierState from /load, /metrics scrapes or a Prometheus HTTP API, over loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from strata.autoscale.observe import ObservationError, Observer, PrometheusSource, ScrapeSource
from strata.platform.base import Endpoint, Replica
from tests.autoscale.autoscale_helpers import report


class _Quiet(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[str]:
    server = _Quiet(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                   lifespan="off"))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


class Engine:
    """A replica's /load and /metrics with values the test sets."""

    def __init__(self) -> None:
        self.prompt = self.generation = self.finished = 0.0
        self.tpot_fast = self.tpot_slow = 0.0
        self.app = Starlette(routes=[Route("/load", self.load), Route("/metrics", self.metrics)])

    async def load(self, request: Request) -> JSONResponse:
        return JSONResponse(report(kv_usage=0.25, running=3, waiting=1).to_dict())

    async def metrics(self, request: Request) -> PlainTextResponse:
        total = self.tpot_fast + self.tpot_slow
        return PlainTextResponse(f"""# TYPE strata_prompt_tokens counter
strata_prompt_tokens_total{{model_name="m"}} {self.prompt}
# TYPE strata_generation_tokens counter
strata_generation_tokens_total{{model_name="m"}} {self.generation}
# TYPE strata_requests counter
strata_requests_total{{model_name="m",finish_reason="length"}} {self.finished}
# TYPE strata_time_per_output_token_seconds histogram
strata_time_per_output_token_seconds_bucket{{model_name="m",le="0.05"}} {self.tpot_fast}
strata_time_per_output_token_seconds_bucket{{model_name="m",le="0.1"}} {total}
strata_time_per_output_token_seconds_bucket{{model_name="m",le="+Inf"}} {total}
""")


class FixedPlatform:
    def __init__(self, replicas: list[Replica], desired: int) -> None:
        self._replicas, self._desired = replicas, desired

    async def scale(self, tier: str, replicas: int) -> None:
        self._desired = replicas

    def endpoints(self, tier: str) -> list[Endpoint]:
        return [Endpoint(tier, r.replica_id, r.url) for r in self._replicas
                if r.ready and r.url]

    async def drain(self, replica_id: str) -> None:
        raise NotImplementedError

    def desired(self, tier: str) -> int:
        return self._desired

    def replicas(self, tier: str) -> list[Replica]:
        return list(self._replicas)

    async def wait_changed(self, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)

    async def close(self) -> None:
        pass


def gateway_page(arrivals: float, queued: float, ttft_fast: float, ttft_slow: float) -> str:
    return f"""# TYPE strata_cluster_requests_received counter
strata_cluster_requests_received_total{{tier="engine"}} {arrivals}
# TYPE strata_gateway_queue_depth gauge
strata_gateway_queue_depth{{model="m"}} {queued}
# TYPE strata_gateway_requests_in_flight gauge
strata_gateway_requests_in_flight {7}
# TYPE strata_gateway_ttft_seconds histogram
strata_gateway_ttft_seconds_bucket{{le="0.5",model="m"}} {ttft_fast}
strata_gateway_ttft_seconds_bucket{{le="1.0",model="m"}} {ttft_fast + ttft_slow}
strata_gateway_ttft_seconds_bucket{{le="+Inf",model="m"}} {ttft_fast + ttft_slow}
"""


async def test_scrape_source_builds_a_windowed_tier_state() -> None:
    engine = Engine()
    page = {"text": gateway_page(0, 0, 0, 0)}

    async def gateway_metrics() -> str:
        return page["text"]

    async with serve(engine.app) as url, httpx.AsyncClient() as http:
        replicas = [Replica("engine", "engine-0", "ready", url, started_at=100.0, ready_at=112.0),
                    Replica("engine", "engine-1", "backoff", None, started_at=130.0, restarts=2)]
        observer = Observer(FixedPlatform(replicas, 2), ScrapeSource(gateway_metrics, http, 60),
                            http)
        first = await observer.observe("engine", now=200.0)
        assert first.arrival_rate_rps == 0 and first.last_request_at is None
        assert first.startup_s == (12.0,)

        page["text"] = gateway_page(arrivals=10, queued=3, ttft_fast=9, ttft_slow=1)
        engine.prompt, engine.generation, engine.finished = 1000, 400, 10
        engine.tpot_fast, engine.tpot_slow = 4, 4
        s = await observer.observe("engine", now=205.0)

    assert s.current_replicas == 2
    assert s.arrival_rate_rps == pytest.approx(2.0)
    assert (s.mean_prompt_tokens, s.mean_output_tokens) == (100.0, 40.0)
    assert s.pending_requests == 3 and s.in_flight_requests == 7
    assert s.last_request_at == 205.0
    assert len(s.ttft_s) == 10 and max(s.ttft_s) <= 1.0
    assert len(s.tpot_s) == 8
    assert s.metric("ttft_p90_s") == pytest.approx(0.5 * 8.5 / 9)  # 9th of 10: last fast one
    ready, crashed = s.replicas
    assert ready.ready and ready.ready_changed_at == 112.0 and ready.report is not None
    assert ready.metric("kv_usage") == pytest.approx(0.25) and ready.metric("concurrency") == 4
    assert not crashed.ready and crashed.report is None and not crashed.has_been_ready
    assert s.startup_s == (12.0,)  # remembered once


async def test_scrape_source_fails_when_the_gateway_page_is_unreadable() -> None:
    async def broken() -> str:
        raise httpx.ConnectError("refused")

    async with httpx.AsyncClient() as http:
        source = ScrapeSource(broken, http, 60)
        with pytest.raises(ObservationError, match="gateway /metrics unreadable"):
            await source.signals("engine", [], 0.0)


class FakePrometheus:
    """Answers /api/v1/query like Prometheus does, from a table of query -> result."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.queries: list[str] = []
        self.app = Starlette(routes=[Route("/api/v1/query", self.query)])

    async def query(self, request: Request) -> JSONResponse:
        q = request.query_params["query"]
        self.queries.append(q)
        for key, result in self.answers.items():
            if key in q:
                if isinstance(result, str):
                    return JSONResponse({"status": "error", "errorType": "bad_data",
                                         "error": result}, 400)
                return JSONResponse({"status": "success", "data": result})
        return JSONResponse({"status": "success", "data": {"resultType": "vector",
                                                           "result": []}})


def vector(*items: tuple[dict[str, str], float]) -> dict[str, Any]:
    return {"resultType": "vector",
            "result": [{"metric": m, "value": [1.7e9, str(v)]} for m, v in items]}


async def test_prometheus_source_maps_queries_to_signals() -> None:
    prom = FakePrometheus({
        "rate(strata_cluster_requests_received_total": vector(({}, 1.5)),
        "sum(strata_cluster_requests_received_total": vector(({}, 42)),
        "strata_gateway_queue_depth": vector(({}, 2)),
        "strata_gateway_requests_in_flight": vector(({}, 5)),
        "increase(strata_prompt_tokens_total": vector(({}, 3000)),
        "increase(strata_generation_tokens_total": vector(({}, 600)),
        "increase(strata_requests_total": vector(({}, 30)),
        "strata_gateway_ttft_seconds_bucket": vector(({"le": "0.5"}, 8), ({"le": "+Inf"}, 10)),
        "my_custom_series": {"resultType": "scalar", "result": [1.7e9, "0.75"]},
    })
    async with serve(prom.app) as url, httpx.AsyncClient() as http:
        source = PrometheusSource(url, http, window_s=30,
                                  custom={"engine": {"custom_q": "max(my_custom_series{t='$tier'})"}})
        s = await source.signals("engine", [], 0.0)
    assert s.arrival_rate_rps == 1.5 and s.arrivals_total == 42
    assert (s.pending_requests, s.in_flight_requests) == (2, 5)
    assert (s.mean_prompt_tokens, s.mean_output_tokens) == (100.0, 20.0)
    assert len(s.ttft_s) == 10 and s.tpot_s == ()
    assert s.extra == {"custom_q": 0.75}
    assert "max(my_custom_series{t='engine'})" in prom.queries
    assert any('[30s]' in q and 'tier="engine"' in q for q in prom.queries)


async def test_prometheus_errors_become_observation_errors() -> None:
    prom = FakePrometheus({"strata_gateway_queue_depth": "parse error at char 3"})
    async with serve(prom.app) as url, httpx.AsyncClient() as http:
        with pytest.raises(ObservationError, match="parse error at char 3"):
            await PrometheusSource(url, http, 30).signals("engine", [], 0.0)
        matrix = FakePrometheus({"": {"resultType": "matrix", "result": []}})
    async with serve(matrix.app) as url, httpx.AsyncClient() as http:
        with pytest.raises(ObservationError, match="instant vector or scalar"):
            await PrometheusSource(url, http, 30).scalar("up[5m]")
    async with httpx.AsyncClient() as http:
        with pytest.raises(ObservationError, match="unreachable"):
            await PrometheusSource("http://127.0.0.1:1", http, 30).scalar("up")
