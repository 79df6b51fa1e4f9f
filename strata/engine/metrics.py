"""An engine replica's Prometheus series, under strata's names and under vLLM's.

vLLM's production-stack router, the Gateway API inference extension's endpoint picker
(llm-d) and KServe read ``vllm:`` series from each replica's /metrics; a strata engine
exports them too, so it can serve behind those routers and their dashboards unchanged.
Each quantity is measured once: the gauges and counters are read from the engine core at
scrape time and yielded under both names, and each latency histogram is observed once and
its buckets re-exposed under the vLLM name. The ``vllm:`` series carry vLLM's labels
(``model_name`` and ``engine``); nothing those routers read filters on other labels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from strata.engine.core import EngineCore

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)

# vLLM labels every series with the engine index of its data-parallel rank; one here.
_VLLM_ENGINE = "0"


def _family(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], names: tuple[str, ...],
            doc: str, value: float, model: str) -> Iterator[Metric]:
    """One reading under each name, strata's first (a counter's ``_total`` comes on exposition)."""
    for name in names:
        vllm = name.startswith("vllm:")
        family = kind(name, doc, labels=["model_name", "engine"] if vllm else ["model_name"])
        family.add_metric([model, _VLLM_ENGINE] if vllm else [model], value)
        yield family


def _renamed(family: Metric, name: str, doc: str) -> Metric:
    """``family`` (a collected histogram) under another name, with vLLM's ``engine`` label."""
    out = Metric(name, doc, family.type)
    prefix = len(family.name)
    out.samples = [s._replace(name=name + s.name[prefix:], labels={**s.labels, "engine": _VLLM_ENGINE})
                   for s in family.samples]
    return out


class _EngineCollector(Collector):
    """Series read from the engine core at scrape time (no per-step bookkeeping)."""

    def __init__(self, core: EngineCore, aliases: list[tuple[Histogram, str, str]]) -> None:
        self.core = core
        self.aliases = aliases  # (histogram, its vLLM name, vLLM's help text)

    def collect(self) -> Iterator[Metric]:
        core = self.core
        r = core.load_report()
        cache = core.blocks.stats()
        m = core.model_name
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        readings: list[tuple[Any, tuple[str, ...], str, float]] = [
            (gauge, ("strata_num_requests_running", "vllm:num_requests_running"),
             "Sequences in the running batch.", r.running),
            (gauge, ("strata_num_requests_waiting", "vllm:num_requests_waiting"),
             "Sequences waiting to be scheduled.", r.waiting),
            # vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc (both 0-1); routers
            # read either.
            (gauge, ("strata_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc",
                     "vllm:gpu_cache_usage_perc"),
             "Fraction of KV blocks in use (0-1).", r.kv_usage),
            (gauge, ("strata_kv_cache_free_blocks",), "Free (or evictable) KV blocks.",
             r.free_kv_blocks),
            (gauge, ("strata_kv_cache_total_blocks",), "KV blocks of this replica.",
             r.total_kv_blocks),
            (gauge, ("strata_prefix_cache_hit_ratio", "vllm:gpu_prefix_cache_hit_rate"),
             "Prompt tokens served from the prefix cache, over those looked up.", cache.hit_rate),
            (gauge, ("strata_generation_tokens_per_second",), "Output tokens/s, recent window.",
             r.generation_tokens_per_s),
            (gauge, ("strata_prompt_tokens_per_second",), "Prefilled tokens/s, recent window.",
             r.prompt_tokens_per_s),
            (counter, ("strata_prompt_tokens", "vllm:prompt_tokens"), "Prefilled prompt tokens.",
             core.meter.total_prompt_tokens),
            (counter, ("strata_generation_tokens", "vllm:generation_tokens"), "Generated tokens.",
             core.meter.total_generated_tokens),
            # Tokens, as vLLM counts them; production-stack reads the older gpu_ names.
            (counter, ("strata_prefix_cache_queries", "vllm:prefix_cache_queries",
                       "vllm:gpu_prefix_cache_queries"),
             "Prompt tokens looked up in the prefix cache.", cache.queried_tokens),
            (counter, ("strata_prefix_cache_hits", "vllm:prefix_cache_hits",
                       "vllm:gpu_prefix_cache_hits"),
             "Prompt tokens found in the prefix cache.", cache.hit_tokens),
        ]
        if core.threads is not None:
            readings.append((gauge, ("strata_engine_compute_threads",),
                             "Compute threads the engine runs now (strata.engine.threads).",
                             core.threads.threads))
        for kind, names, doc, value in readings:
            yield from _family(kind, names, doc, value, m)
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "The KV cache's configuration (labels; value 1).",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"])
        info.add_metric([str(core.blocks.block_size), str(core.blocks.num_blocks),
                         str(core.blocks.enable_prefix_caching), _VLLM_ENGINE], 1)
        yield info
        # The endpoint picker asks every replica for its LoRA state; strata serves none.
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info", "LoRA adapters loaded and waiting (none; value: now).",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters", "engine"])
        lora.add_metric(["0", "", "", _VLLM_ENGINE], time.time())
        yield lora
        for hist, name, doc in self.aliases:
            for family in hist.collect():
                yield _renamed(family, name, doc)


class EngineMetrics:
    """One replica's registry: the core's series plus the request latency histograms."""

    def __init__(self, core: EngineCore) -> None:
        """Register every series (the HTTP layer observes ``ttft``, ``tpot``, ``e2e``)."""
        self.registry = r = CollectorRegistry()
        lbl = ["model_name"]
        self.ttft = Histogram("strata_time_to_first_token_seconds", "Time to first token.", lbl,
                              registry=r, buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("strata_time_per_output_token_seconds",
                              "Mean time per output token after the first.", lbl, registry=r,
                              buckets=TPOT_BUCKETS)
        self.e2e = Histogram("strata_e2e_request_latency_seconds", "Request latency end to end.",
                             lbl, registry=r, buckets=LATENCY_BUCKETS)
        self.requests = Counter("strata_requests", "Finished requests by finish reason.",
                                lbl + ["finish_reason"], registry=r)
        self.errors = Counter("strata_request_errors", "Rejected requests by HTTP status.",
                              lbl + ["status"], registry=r)
        r.register(_EngineCollector(core, [
            (self.ttft, "vllm:time_to_first_token_seconds", "Time to first token in seconds."),
            # One observation per request (its mean), as vLLM's per-request TPOT histogram.
            (self.tpot, "vllm:time_per_output_token_seconds",
             "Time per output token in seconds (per-request mean)."),
            (self.e2e, "vllm:e2e_request_latency_seconds", "End to end request latency in seconds."),
        ]))
