"""An engine's /metrics under strata's names and vLLM's, read the way vLLM's routers read them.

A real engine (the tiny random-weight model) serves its app on loopback; requests go over
HTTP and /metrics is parsed with prometheus_client's text parser. The ``vllm:`` series must
carry the same readings as the ``strata_`` ones they alias, and must be found by the rules
vLLM production-stack's router (``src/vllm_router/stats/engine_stats.py``) and the Gateway
API inference extension's endpoint picker apply (both re-implemented here from their
documented behaviour, not copied).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from strata.engine.engine import AsyncEngine, EngineConfig, build_engine_core
from strata.engine.server import build_app
from tests.gateway.servers import serve

NUM_BLOCKS, BLOCK = 64, 16
# Same gauge or counter, two or three names: (strata's sample, vLLM's samples).
ALIASES = {
    "strata_num_requests_running": ["vllm:num_requests_running"],
    "strata_num_requests_waiting": ["vllm:num_requests_waiting"],
    "strata_kv_cache_usage_ratio": ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
    "strata_prefix_cache_hit_ratio": ["vllm:gpu_prefix_cache_hit_rate"],
    "strata_prompt_tokens_total": ["vllm:prompt_tokens_total"],
    "strata_generation_tokens_total": ["vllm:generation_tokens_total"],
    "strata_prefix_cache_queries_total": ["vllm:prefix_cache_queries_total",
                                          "vllm:gpu_prefix_cache_queries_total"],
    "strata_prefix_cache_hits_total": ["vllm:prefix_cache_hits_total",
                                       "vllm:gpu_prefix_cache_hits_total"],
}
HISTOGRAMS = {
    "strata_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "strata_time_per_output_token_seconds": "vllm:time_per_output_token_seconds",
    "strata_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
}


@asynccontextmanager
async def serve_engine(model: Path, max_num_seqs: int = 8, max_model_len: int = 512,
                       internal_token: str | None = None) -> AsyncIterator[tuple[str, str]]:
    """A real engine serving its HTTP app on loopback; yields (base URL, model name)."""
    core = build_engine_core(EngineConfig(
        model=str(model), dtype="float32", device="cpu", threads=1, num_kv_blocks=NUM_BLOCKS,
        block_size=BLOCK, max_model_len=max_model_len, max_num_seqs=max_num_seqs))
    engine = AsyncEngine(core)
    engine.start()
    try:
        async with serve(build_app(engine, internal_token=internal_token), lifespan="off") as url:
            yield url, core.model_name
    finally:
        engine.stop()


async def _scrape(http: httpx.AsyncClient, url: str) -> dict[str, Metric]:
    resp = await http.get(url + "/metrics")
    assert resp.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def _samples(families: dict[str, Metric]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for f in families.values():
        for s in f.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _value(samples: dict[str, list[Any]], name: str) -> float:
    (s,) = samples[name]
    return s.value


def _assert_aliases_agree(families: dict[str, Metric], model: str) -> None:
    samples = _samples(families)
    for strata, vllm_names in ALIASES.items():
        for name in vllm_names:
            (s,) = samples[name]
            assert s.labels == {"model_name": model, "engine": "0"}, name
            assert s.value == _value(samples, strata), (name, s.value)


async def _complete(http: httpx.AsyncClient, url: str, model: str, prompt: str,
                    stream: bool = False, max_tokens: int = 4) -> int:
    """One completion; returns its completion tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if not stream:
        resp = await http.post(url + "/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()["usage"]["completion_tokens"]
    body["stream_options"] = {"include_usage": True}
    tokens = 0
    async with http.stream("POST", url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[len("data: "):]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


PROMPT = "The history of the printing press begins with movable type, " * 6


async def test_vllm_series_carry_the_strata_readings(tiny_hf_dir: Path) -> None:
    async with serve_engine(tiny_hf_dir) as (url, model), httpx.AsyncClient(timeout=60) as http:
        made = [await _complete(http, url, model, PROMPT) for _ in range(2)]
        made.append(await _complete(http, url, model, PROMPT + " again", stream=True,
                                    max_tokens=6))
        families = await _scrape(http, url)
        samples = _samples(families)
        _assert_aliases_agree(families, model)
        # A repeated prompt was served from the prefix cache, counted in tokens.
        hits = _value(samples, "vllm:prefix_cache_hits_total")
        queries = _value(samples, "vllm:prefix_cache_queries_total")
        assert hits >= BLOCK and queries >= 3 * len(PROMPT.split())
        assert _value(samples, "vllm:gpu_prefix_cache_hit_rate") == pytest.approx(hits / queries)
        assert _value(samples, "vllm:generation_tokens_total") == sum(made) == 14
        # Histograms: observed once, the same buckets under both names.
        for strata, vllm in HISTOGRAMS.items():
            assert families[vllm].type == "histogram"
            mine = [(s.name[len(strata):], s.labels.get("le"), s.value)
                    for s in families[strata].samples if not s.name.endswith("_created")]
            theirs = [(s.name[len(vllm):], s.labels.get("le"), s.value)
                      for s in families[vllm].samples if not s.name.endswith("_created")]
            assert mine == theirs and mine, vllm
            for s in families[vllm].samples:
                assert s.labels["model_name"] == model and s.labels["engine"] == "0"
        assert _value(samples, "vllm:e2e_request_latency_seconds_count") == 3
        assert _value(samples, "vllm:time_to_first_token_seconds_count") == 1  # the stream
        assert _value(samples, "vllm:time_per_output_token_seconds_count") == 1
        (info,) = samples["vllm:cache_config_info"]
        assert info.labels["block_size"] == str(BLOCK)
        assert info.labels["num_gpu_blocks"] == str(NUM_BLOCKS)


async def test_queue_readings_agree_while_requests_wait(tiny_hf_dir: Path) -> None:
    """One sequence at a time, three sent: scrapes see a queue, and both names agree on it."""
    async with serve_engine(tiny_hf_dir, max_num_seqs=1) as (url, model), \
            httpx.AsyncClient(timeout=60) as http:
        sent = asyncio.gather(*[_complete(http, url, model, f"{i} {PROMPT}", max_tokens=48)
                                for i in range(3)])
        seen: set[tuple[float, float]] = set()
        while not sent.done():
            families = await _scrape(http, url)
            _assert_aliases_agree(families, model)
            s = _samples(families)
            seen.add((_value(s, "vllm:num_requests_running"),
                      _value(s, "vllm:num_requests_waiting")))
        assert await sent == [48, 48, 48]
        assert any(running == 1 and waiting >= 1 for running, waiting in seen), seen
        assert all(running <= 1 for running, _ in seen)


def _production_stack_stats(text: str) -> dict[str, float]:
    """production-stack's router rule: walk every sample, keep the last value of each name."""
    wanted = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "queuing",
              "vllm:gpu_prefix_cache_hit_rate": "hit_rate",
              "vllm:gpu_prefix_cache_hits_total": "hits",
              "vllm:gpu_prefix_cache_queries_total": "queries",
              "vllm:gpu_cache_usage_perc": "kv_usage"}
    stats: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                stats[wanted[sample.name]] = sample.value
    return stats


def _endpoint_picker_metrics(text: str) -> dict[str, Any]:
    """The endpoint picker's rule: a family by its default flag name, its newest sample;
    LoRA state and block size from labels of the info gauges."""
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def latest(name: str) -> Any:
        samples = families[name].samples
        assert samples, f"metric family {name} has no sample"
        return max(samples, key=lambda s: s.timestamp or 0)

    lora = latest("vllm:lora_requests_info")
    running = [a for a in lora.labels["running_lora_adapters"].split(",") if a.strip()]
    return {
        "waiting": latest("vllm:num_requests_waiting").value,
        "running": latest("vllm:num_requests_running").value,
        "kv_usage": latest("vllm:kv_cache_usage_perc").value,
        "max_lora": int(lora.labels["max_lora"]),
        "active_adapters": running,
        "block_size": int(latest("vllm:cache_config_info").labels["block_size"]),
    }


async def test_routers_parse_the_engine_as_a_vllm_replica(tiny_hf_dir: Path) -> None:
    async with serve_engine(tiny_hf_dir) as (url, model), httpx.AsyncClient(timeout=60) as http:
        for _ in range(2):
            await _complete(http, url, model, PROMPT)
        text = (await http.get(url + "/metrics")).text
        load = (await http.get(url + "/load")).json()
    stats = _production_stack_stats(text)
    assert set(stats) == {"running", "queuing", "hit_rate", "hits", "queries", "kv_usage"}
    assert stats["running"] == load["running"] == 0 and stats["queuing"] == load["waiting"] == 0
    assert stats["hits"] >= BLOCK and stats["hit_rate"] == pytest.approx(
        stats["hits"] / stats["queries"])
    assert stats["kv_usage"] == pytest.approx(1 - load["free_kv_blocks"] / load["total_kv_blocks"])
    epp = _endpoint_picker_metrics(text)
    assert epp == {"waiting": 0, "running": 0, "kv_usage": stats["kv_usage"], "max_lora": 0,
                   "active_adapters": [], "block_size": BLOCK}


async def test_the_stage_head_exports_the_same_families(tiny_hf_dir: Path) -> None:
    """The head of a pipeline serves the engine's app, so routers read it like an engine."""
    from strata.stages.head_server import HeadConfig, build_head, build_head_app

    engine = build_head(HeadConfig(stages=((0, 1), (1, 2)), model=str(tiny_hf_dir),
                                   dtype="float32", device="cpu", threads=1,
                                   num_kv_blocks=NUM_BLOCKS, max_model_len=256))
    engine.start()
    try:
        async with serve(build_head_app(engine), lifespan="off") as url, \
                httpx.AsyncClient(timeout=30) as http:
            text = (await http.get(url + "/metrics")).text
    finally:
        engine.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    _assert_aliases_agree(families, engine.core.model_name)
    for name in HISTOGRAMS.values():
        assert families[name].type == "histogram"
    assert _endpoint_picker_metrics(text)["block_size"] == BLOCK
