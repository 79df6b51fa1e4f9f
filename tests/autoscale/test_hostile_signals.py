"""The control plane survives bad signals: garbage, NaN, errors and silence, over loopback.

Every server here is a real HTTP server on 127.0.0.1 answering what a broken or hostile
replica, gateway or Prometheus might; the autoscaler must drop that replica's sample or
skip the tier's tick, say why, and keep going.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from strata.autoscale.loop import Autoscaler
from strata.autoscale.observe import (
    ObservationError,
    Observer,
    PrometheusSource,
    ScrapeSource,
    parse_load_report,
)
from strata.platform.base import Replica
from tests.autoscale.autoscale_helpers import report
from tests.autoscale.test_loop import hpa
from tests.autoscale.test_observe import FakePrometheus, FixedPlatform, gateway_page, serve, vector

GOOD = report(kv_usage=0.5, running=2).to_dict()


def _with(**changes: Any) -> str:
    return json.dumps({**GOOD, **changes})


# Raw /load bodies (text, so NaN and Infinity go out as Python's json writes them).
BAD_LOAD_BODIES: dict[str, tuple[int, str]] = {
    "list": (200, "[1, 2, 3]"),
    "not-json": (200, "<html>oops</html>"),
    "nan": (200, _with(kv_usage=0.5, prompt_tokens_per_s=float("nan"))),
    "inf": (200, _with(decode_step_s=float("inf"))),
    "negative": (200, _with(running=-3)),
    "string-count": (200, _with(waiting="7")),
    "bool-count": (200, _with(waiting=True)),
    "missing": (200, json.dumps({k: v for k, v in GOOD.items() if k != "free_kv_blocks"})),
    "more-free-than-total": (200, _with(free_kv_blocks=GOOD["total_kv_blocks"] + 1)),
    "hit-rate-above-1": (200, _with(prefix_hit_rate=1.5)),
    "http-500": (500, "{}"),
}


@pytest.mark.parametrize("body", list(BAD_LOAD_BODIES.values()), ids=list(BAD_LOAD_BODIES))
def test_bad_load_bodies_are_rejected_with_a_reason(body: tuple[int, str]) -> None:
    status, text = body
    if status != 200:
        return  # an HTTP error never reaches the parser; the server test covers it
    try:
        data = json.loads(text)
    except ValueError:
        return  # not JSON: rejected by the JSON decoder, covered end to end below
    with pytest.raises(ValueError, match="/load"):
        parse_load_report(data)


def test_a_good_load_body_parses_and_old_replicas_may_omit_defaults() -> None:
    assert parse_load_report(GOOD).running == 2
    old = {k: v for k, v in GOOD.items() if k not in ("ready", "draining", "stage")}
    assert parse_load_report(old).ready is True


class Replicas:
    """One server whose /<name>/load and /<name>/metrics answer as replica <name> is set to."""

    def __init__(self, slow_s: float = 1.0) -> None:
        self.slow_s = slow_s
        self.metrics_pages: dict[str, str] = {}
        self.app = Starlette(routes=[Route("/{name}/load", self.load),
                                     Route("/{name}/metrics", self.metrics)])

    async def load(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == "slow":
            await asyncio.sleep(self.slow_s)
        if name in BAD_LOAD_BODIES:
            status, text = BAD_LOAD_BODIES[name]
            return Response(text, status, media_type="application/json")
        return JSONResponse(GOOD)

    async def metrics(self, request: Request) -> PlainTextResponse:
        name = request.path_params["name"]
        return PlainTextResponse(self.metrics_pages.get(name, ""))


def _replica(url: str, name: str, started_at: float = 0.0) -> Replica:
    return Replica("engine", name, "ready", f"{url}/{name}", started_at, ready_at=started_at + 1)


async def test_each_bad_replica_is_dropped_and_the_rest_observed() -> None:
    """Garbage, NaN, errors and a replica that never answers: only the good one counts."""
    server = Replicas()
    registry = CollectorRegistry()
    names = ["good", "slow", *BAD_LOAD_BODIES]

    async def gw() -> str:
        return gateway_page(10, 0, 1, 1)

    async with serve(server.app) as url, httpx.AsyncClient() as http:
        platform = FixedPlatform([_replica(url, n) for n in names], desired=len(names))
        source = ScrapeSource(gw, http, 60, timeout_s=0.5)
        observer = Observer(platform, source, http, timeout_s=0.5, registry=registry)
        state = await observer.observe("engine", 100.0)
    got = {s.replica_id: s.report for s in state.replicas}
    assert got["good"] is not None and got["good"].running == 2
    assert all(got[n] is None for n in names if n != "good")

    def dropped(reason: str) -> float | None:
        return registry.get_sample_value("strata_autoscaler_dropped_samples_total",
                                         {"tier": "engine", "reason": reason})

    assert dropped("timeout") == 1
    assert dropped("invalid") == len(BAD_LOAD_BODIES)


NAN_ENGINE = """# TYPE strata_prompt_tokens counter
strata_prompt_tokens_total{model_name="m"} NaN
"""


async def test_scrape_source_drops_bad_engine_pages_and_rejects_a_bad_gateway() -> None:
    server = Replicas()
    server.metrics_pages = {
        "nan": NAN_ENGINE,
        "not-json": "this is not { a metrics page",
        "good": "# TYPE strata_prompt_tokens counter\nstrata_prompt_tokens_total 100\n",
        "many-buckets": "".join(
            f'strata_time_per_output_token_seconds_bucket{{le="{i}"}} {i}\n' for i in range(200)),
    }
    gateway = {"page": gateway_page(10, 0, 1, 1)}

    async def gw() -> str:
        return gateway["page"]

    async with serve(server.app) as url, httpx.AsyncClient() as http:
        source = ScrapeSource(gw, http, 60, timeout_s=0.5)
        replicas = [_replica(url, n) for n in ("nan", "not-json", "good", "many-buckets")]
        s = await source.signals("engine", replicas, 0.0)
        s = await source.signals("engine", replicas, 10.0)
        assert s.arrival_rate_rps == 0.0 and s.tpot_s == ()
        # Gateway arrivals + the good replica's 3 counters + 3 gateway TTFT bounds + 3 drop
        # reasons: nothing from the bad pages (the 200 bounds above were not kept).
        assert source.state_size() == 1 + 3 + 3 + 3
        for bad in ("strata_cluster_requests_received_total{tier=\"engine\"} NaN\n",
                    "strata_gateway_queue_depth -4\n", "garbage {{{\n"):
            gateway["page"] = bad
            with pytest.raises(ObservationError, match="gateway /metrics unreadable"):
                await source.signals("engine", replicas, 20.0)

        async def silent() -> str:
            await asyncio.sleep(5)
            return ""

        with pytest.raises(ObservationError, match="TimeoutError"):
            await ScrapeSource(silent, http, 60, timeout_s=0.2).signals("engine", [], 0.0)


WRONG_SHAPES: dict[str, Any] = {
    "nan-value": {"status": "success", "data": vector(({}, float("nan")))},
    "inf-scalar": {"status": "success", "data": {"resultType": "scalar",
                                                 "result": [1.7e9, "+Inf"]}},
    "no-data": {"status": "success"},
    "result-not-list": {"status": "success", "data": {"resultType": "vector", "result": 7}},
    "value-garbage": {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {}, "value": [1.7e9, "lots"]}]}},
    "value-short": {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {}, "value": []}]}},
    "body-a-list": [1, 2],
}


class RawPrometheus:
    """Answers every query with one fixed body (JSON, or raw text), optionally late."""

    def __init__(self, body: Any, delay_s: float = 0.0) -> None:
        self.body, self.delay_s = body, delay_s
        self.app = Starlette(routes=[Route("/api/v1/query", self.query)])

    async def query(self, request: Request) -> Response:
        await asyncio.sleep(self.delay_s)
        if isinstance(self.body, str):
            return Response(self.body, 200, media_type="application/json")
        return Response(json.dumps(self.body), 200, media_type="application/json")


@pytest.mark.parametrize("body", list(WRONG_SHAPES.values()), ids=list(WRONG_SHAPES))
async def test_prometheus_answers_of_the_wrong_shape_are_observation_errors(body: Any) -> None:
    prom = RawPrometheus(body)
    async with serve(prom.app) as url, httpx.AsyncClient() as http:
        with pytest.raises(ObservationError):
            await PrometheusSource(url, http, 30).signals("engine", [], 0.0)


async def test_prometheus_silence_and_non_json_are_observation_errors() -> None:
    async with serve(RawPrometheus("not json at all").app) as url, httpx.AsyncClient() as http:
        with pytest.raises(ObservationError, match="not JSON"):
            await PrometheusSource(url, http, 30).scalar("up")
    async with serve(RawPrometheus(WRONG_SHAPES["no-data"], delay_s=1).app) as url, \
            httpx.AsyncClient() as http:
        with pytest.raises(ObservationError, match="TimeoutError"):
            await PrometheusSource(url, http, 30, timeout_s=0.3).scalar("up")


async def test_a_bad_histogram_bound_is_an_observation_error() -> None:
    prom = FakePrometheus({"strata_gateway_ttft_seconds_bucket": vector(({"le": "soon"}, 3))})
    async with serve(prom.app) as url, httpx.AsyncClient() as http:
        with pytest.raises(ObservationError, match="'le'"):
            await PrometheusSource(url, http, 30).signals("engine", [], 0.0)


async def test_the_loop_skips_nan_ticks_and_recovers() -> None:
    """The whole chain: a NaN from Prometheus skips the tick; a good answer decides again."""
    answers: dict[str, Any] = {"rate(": vector(({}, float("nan")))}
    prom = FakePrometheus(answers)
    registry = CollectorRegistry()
    async with serve(prom.app) as url, httpx.AsyncClient() as http:
        platform = FixedPlatform([], desired=1)
        observer = Observer(platform, PrometheusSource(url, http, 30), http)
        loop = Autoscaler(platform, observer, {"engine": hpa()},  # type: ignore[arg-type]
                          period_s=15, registry=registry, clock=lambda: 1000.0)
        assert await loop.tick() == []
        assert "nan" in (loop.last_error("engine") or "").lower()
        answers["rate("] = vector(({}, 3.0))
        assert [d.tier for d in await loop.tick()] == ["engine"]
    assert registry.get_sample_value("strata_autoscaler_skipped_ticks_total",
                                     {"tier": "engine", "stage": "observe"}) == 1


async def test_state_stays_bounded_under_replica_churn() -> None:
    """Replicas come and go many times: what the observer and source keep does not grow."""
    server = Replicas()
    for i in range(8):
        server.metrics_pages[f"r{i}"] = (
            "# TYPE strata_prompt_tokens counter\nstrata_prompt_tokens_total 5\n"
            f'strata_time_per_output_token_seconds_bucket{{le="{0.01 * (i + 1)}"}} 1\n')

    async def gw() -> str:
        return gateway_page(10, 0, 1, 1)

    sizes = []
    async with serve(server.app) as url, httpx.AsyncClient() as http:
        platform = FixedPlatform([], desired=3)
        source = ScrapeSource(gw, http, window_s=30, timeout_s=1.0)
        observer = Observer(platform, source, http, startup_memory=5)
        for step in range(60):
            # Three replicas live at a time, each a fresh process (new id and start time);
            # some answer garbage to /load so drop reasons are kept and must go too.
            live = [f"r{(step + k) % 8}" for k in range(3)] + ["not-json"]
            platform._replicas = [
                Replica("engine", f"{n}-{step}", "ready", f"{url}/{n}", float(step),
                        ready_at=step + 0.5) for n in live]
            await observer.observe("engine", step * 15.0)
            sizes.append((observer.state_size(), source.state_size()))
    first, last = sizes[10], sizes[-1]
    assert max(o for o, _ in sizes) <= 4 + 4 + 5 + 1  # counted + dropped + startups + arrivals
    assert last[1] <= first[1] + 2 and max(s for _, s in sizes) < 40
    observer.forget("engine")
    assert observer.state_size() == 0 and source.state_size() <= 1
