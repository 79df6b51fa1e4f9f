"""What an engine says its prefix cache holds (GET /internal/prefix), as routing keys.

The keys are the gateway's own prefix-chunk hashes (strata.routing.prompt), which the
engine computes from each prompt it admits and forgets when the KV blocks holding that
prefix are evicted (strata.engine.prefix_registry). Every gateway polling an engine thus
sees the same truth, whichever gateway sent the prompt.

The protocol is a versioned log. Each engine process draws a random ``epoch`` and numbers
every change of its key set (``version``). A poller passes the epoch and version it last
applied; the engine answers with the keys added and removed since then, or with the whole
set (``full``) when the epoch is not its own (a restart, a first poll) or the change log no
longer reaches back that far. Both sides bound the lists (``MAX_KEYS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The most keys a report may carry: an engine never holds more (its registry's capacity is
# capped here), and a gateway refuses a larger body rather than hold it.
MAX_KEYS = 1 << 16


class PrefixReportError(ValueError):
    """A /internal/prefix body that is not a valid report."""


def _keys(data: dict[str, Any], name: str) -> tuple[int, ...]:
    value = data.get(name, [])
    if not isinstance(value, list) or len(value) > MAX_KEYS:
        raise PrefixReportError(f"'{name}' must be a list of at most {MAX_KEYS} keys")
    if not all(type(k) is int and 0 <= k < 1 << 32 for k in value):
        raise PrefixReportError(f"'{name}' must hold 32-bit unsigned integers")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class PrefixReport:
    """The engine's key set as of ``version``: whole (``full``) or as a change since ``since``.

    ``chunk_bytes``/``chunk_tokens`` are the engine's prompt-estimator chunking; a gateway
    whose chunking differs computes other keys and must not use the report.
    """

    epoch: str
    version: int
    full: bool
    keys: tuple[int, ...] = ()  # the whole set, when full
    added: tuple[int, ...] = ()  # when not full: keys now held that were not at `since`
    removed: tuple[int, ...] = ()  # when not full: keys held at `since`, gone now
    chunk_bytes: int = 0
    chunk_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON body (only the lists that apply)."""
        d: dict[str, Any] = {"epoch": self.epoch, "version": self.version, "full": self.full,
                             "chunk_bytes": self.chunk_bytes, "chunk_tokens": self.chunk_tokens}
        if self.full:
            d["keys"] = list(self.keys)
        else:
            d["added"], d["removed"] = list(self.added), list(self.removed)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> PrefixReport:
        """Parse and bound-check a body; PrefixReportError names what is wrong."""
        if not isinstance(data, dict):
            raise PrefixReportError("a prefix report must be a JSON object")
        epoch, version, full = data.get("epoch"), data.get("version"), data.get("full")
        if not isinstance(epoch, str) or not epoch or len(epoch) > 64:
            raise PrefixReportError("'epoch' must be a non-empty string of at most 64 chars")
        if type(version) is not int or version < 0:
            raise PrefixReportError("'version' must be a non-negative integer")
        if not isinstance(full, bool):
            raise PrefixReportError("'full' must be a boolean")
        chunk_bytes, chunk_tokens = data.get("chunk_bytes", 0), data.get("chunk_tokens", 0)
        if type(chunk_bytes) is not int or type(chunk_tokens) is not int:
            raise PrefixReportError("'chunk_bytes' and 'chunk_tokens' must be integers")
        if full:
            return cls(epoch, version, True, keys=_keys(data, "keys"),
                       chunk_bytes=chunk_bytes, chunk_tokens=chunk_tokens)
        return cls(epoch, version, False, added=_keys(data, "added"),
                   removed=_keys(data, "removed"), chunk_bytes=chunk_bytes,
                   chunk_tokens=chunk_tokens)
