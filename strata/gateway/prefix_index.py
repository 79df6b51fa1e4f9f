"""The gateway's model of one replica's prefix cache, as prefix-chunk hashes.

Two sources feed it. A strata engine reports the hashes its prefix cache holds
(strata.prefix_report), whichever gateway sent the prompts: that set is the truth, so
several gateways in front of the same replicas see the same caches. Between two reports the
gateway also counts what it sent itself (``insert``), which the engine may not have queued
yet; such a local entry stands only until a report that was requested at least ``grace_s``
after it, by when the engine has admitted the prompt and reports it, or has not and so does
not hold it.

A replica that does not report (vLLM, a stage head, an engine whose chunking differs) is
modelled by the local entries alone: a bounded LRU of the prompts sent there, whose capacity
follows the replica's KV size so the model forgets at about the rate the replica evicts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from strata.prefix_report import PrefixReport


class PrefixIndex:
    """Reported hashes plus an LRU of hashes this gateway sent."""

    def __init__(self, capacity: int, grace_s: float = 2.0) -> None:
        """``capacity`` is in local prefix chunks; 0 disables the local entries."""
        self._lru: OrderedDict[int, float] = OrderedDict()  # hash -> when it was sent
        self.capacity = max(0, capacity)
        self.grace_s = grace_s
        self.reported: set[int] | None = None  # None: the replica does not report
        self.epoch: str | None = None
        self.version = 0
        self._trust_after = float("-inf")  # local entries older than this are superseded

    def __len__(self) -> int:
        return len(self._lru) + (len(self.reported) if self.reported is not None else 0)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading chunks of a prompt the replica holds (does not touch recency)."""
        n = 0
        lru, reported, after = self._lru, self.reported, self._trust_after
        for h in hashes:
            if reported is not None and h in reported:
                n += 1
                continue
            sent = lru.get(h)
            if sent is None or sent < after:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int], now: float) -> None:
        """Record that a prompt with these chunk hashes was sent to the replica at ``now``."""
        if self.capacity == 0:
            return
        lru = self._lru
        for h in hashes:
            lru[h] = now
            lru.move_to_end(h)
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def resize(self, capacity: int) -> None:
        """Follow the replica's reported KV size."""
        self.capacity = max(0, capacity)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    # -- engine reports ------------------------------------------------------------------

    def since(self) -> tuple[str | None, int | None]:
        """The (epoch, version) to ask the replica for a change since; (None, None): all."""
        if self.reported is None or self.epoch is None:
            return None, None
        return self.epoch, self.version

    def apply(self, report: PrefixReport, requested_at: float) -> bool:
        """Apply a report requested at ``requested_at``; False if it does not follow the last.

        A delta from another epoch or an older version cannot be applied: the caller then
        asks for the whole set (``forget_reports`` first).
        """
        if report.full:
            self.reported = set(report.keys)
        elif self.reported is None or report.epoch != self.epoch or report.version < self.version:
            return False
        else:
            self.reported.difference_update(report.removed)
            self.reported.update(report.added)
        self.epoch, self.version = report.epoch, report.version
        self._trust_after = max(self._trust_after, requested_at - self.grace_s)
        return True

    def forget_reports(self) -> None:
        """The replica stopped reporting or restarted: back to local entries alone."""
        self.reported = None
        self.epoch = None
        self.version = 0
        self._trust_after = float("-inf")
