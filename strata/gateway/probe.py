"""Load of replicas that do not serve strata's /load: read from their Prometheus metrics.

vLLM exports ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and
``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before v0.10); SGLang exports
``sglang:num_running_reqs``, ``sglang:num_queue_reqs`` and ``sglang:token_usage``. Series
with several label sets (one per model or engine) are summed; usage fractions take the
maximum. Only these lines are parsed, so scraping a large /metrics page stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_RUNNING_B = frozenset(n.encode() for n in _RUNNING)
_WAITING_B = frozenset(n.encode() for n in _WAITING)
_KV_B = frozenset(n.encode() for n in _KV)
_PREFIXES = tuple(n.encode() for n in _RUNNING + _WAITING + _KV)


@dataclass(frozen=True, slots=True)
class MetricsLoad:
    """The three numbers a non-strata replica's metrics give the router."""

    running: int
    waiting: int
    kv_usage: float


def parse_metrics(text: bytes) -> MetricsLoad | None:
    """Extract load from Prometheus text; None when none of the known series is present."""
    running = waiting = 0.0
    kv = 0.0
    seen = False
    for line in text.splitlines():
        if not line.startswith(_PREFIXES):
            continue
        brace = line.find(b"{")
        if brace >= 0:
            name, rest = line[:brace], line[line.rfind(b"}") + 1:]
        else:
            name, _, rest = line.partition(b" ")
        try:
            value = float(rest.split()[0])  # "value [timestamp]"
        except (IndexError, ValueError):
            continue
        name = name.strip()
        if name in _RUNNING_B:
            running += value
        elif name in _WAITING_B:
            waiting += value
        elif name in _KV_B:
            kv = max(kv, value)
        else:
            continue
        seen = True
    if not seen:
        return None
    return MetricsLoad(running=int(running), waiting=int(waiting), kv_usage=min(1.0, kv))
