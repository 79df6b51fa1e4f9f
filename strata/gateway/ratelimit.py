"""Per-client rate limits in requests/min and tokens/min, as token buckets.

Each client (API key name, or client address when keys are off) has two buckets holding at
most one minute's allowance and refilling continuously. A request takes 1 from the request
bucket and its estimated tokens (prompt estimate + max_tokens) from the token bucket, both
or neither. When either is short the answer carries Retry-After: the seconds until both
would hold enough. The clock is passed in (``now``), so the limiter is testable without
sleeping.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-minute allowances; 0 means unlimited."""

    rpm: int = 0
    tpm: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one check: allowed, or wait ``retry_after_s`` (inf: never fits)."""

    allowed: bool
    retry_after_s: float = 0.0
    limit: str = ""  # "rpm" or "tpm" when refused


class _Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp

    def refill(self, capacity: float, now: float) -> None:
        self.level = min(capacity, self.level + (now - self.stamp) * capacity / 60.0)
        self.stamp = now

    def wait_s(self, cost: float, capacity: float) -> float:
        if cost > capacity:
            return math.inf
        return max(0.0, (cost - self.level) * 60.0 / capacity)


class RateLimiter:
    """Token buckets per client; forgets the least recently seen beyond ``max_clients``."""

    def __init__(self, max_clients: int = 100_000) -> None:
        """Bound memory: a client that returns after being forgotten starts with full buckets."""
        self._buckets: OrderedDict[str, tuple[_Bucket, _Bucket]] = OrderedDict()
        self._max_clients = max_clients

    def check(self, client: str, limits: Limits, tokens: int, now: float) -> Verdict:
        """Take one request and ``tokens`` from ``client``'s buckets if both allow it."""
        if limits.rpm <= 0 and limits.tpm <= 0:
            return Verdict(True)
        pair = self._buckets.get(client)
        if pair is None:
            pair = (_Bucket(limits.rpm, now), _Bucket(limits.tpm, now))
            self._buckets[client] = pair
            if len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        req, tok = pair
        waits: list[tuple[float, str]] = []
        if limits.rpm > 0:
            req.refill(limits.rpm, now)
            waits.append((req.wait_s(1, limits.rpm), "rpm"))
        if limits.tpm > 0:
            tok.refill(limits.tpm, now)
            waits.append((tok.wait_s(tokens, limits.tpm), "tpm"))
        wait, which = max(waits)
        if wait > 0:
            return Verdict(False, wait, which)
        if limits.rpm > 0:
            req.level -= 1
        if limits.tpm > 0:
            tok.level -= tokens
        return Verdict(True)
