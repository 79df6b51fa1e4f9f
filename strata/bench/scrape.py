"""Scraping the target's Prometheus ``/metrics`` during a run: replicas and load over time.

Only series that explain a run are kept: anything whose name mentions replicas (the
cluster exports ``strata_tier_replicas{tier=...}``) and the usual running/waiting request
gauges of strata and vLLM. A target without ``/metrics`` is fine: the run goes on and the
result says how many scrapes failed.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from strata.bench.results import Sample

_KEEP = re.compile(
    r"replicas|num_requests_(running|waiting)|requests_(running|waiting)|kv_cache_usage"
    r"|gpu_cache_usage|kv_usage|prefix_cache_hit")
_SKIP_SUFFIXES = ("_created", "_bucket", "_sum", "_count")


def select_samples(text: str) -> dict[str, float]:
    """The interesting samples of one Prometheus text exposition, keyed ``name{labels}``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not _KEEP.search(sample.name) or sample.name.endswith(_SKIP_SUFFIXES):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out


class MetricsScraper:
    """Polls ``<target>/metrics`` every ``interval_s`` until stopped; keeps a time series."""

    def __init__(self, client: aiohttp.ClientSession, url: str, t0: float,
                 interval_s: float = 1.0) -> None:
        """``t0`` is the run's perf_counter origin, so samples share the requests' clock."""
        self.client = client
        self.url = url
        self.t0 = t0
        self.interval_s = interval_s
        self.series: dict[str, list[Sample]] = {}
        self.errors = 0
        self.last_error: str | None = None
        self._stop = asyncio.Event()

    async def scrape_once(self) -> None:
        """Take one sample of every kept series; count a failure instead of raising."""
        now = time.perf_counter() - self.t0
        try:
            timeout = aiohttp.ClientTimeout(total=max(self.interval_s, 1.0))
            async with self.client.get(self.url, timeout=timeout) as response:
                response.raise_for_status()
                samples = select_samples(await response.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            self.errors += 1
            self.last_error = f"{type(err).__name__}: {err}"
            return
        for key, value in samples.items():
            self.series.setdefault(key, []).append(Sample(t_s=now, value=value))

    async def run(self) -> None:
        """Scrape until :meth:`stop` is called, then take one last sample."""
        while not self._stop.is_set():
            await self.scrape_once()
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            except TimeoutError:
                pass
        await self.scrape_once()

    def stop(self) -> None:
        """Ask :meth:`run` to finish after its final sample."""
        self._stop.set()
