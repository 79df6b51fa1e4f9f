"""Which routing keys this engine's prefix cache holds, for the gateways to poll.

A routing key is a gateway's prefix-chunk hash (strata.routing.prompt). When a prompt is
admitted its keys are registered as *queued* (the engine will hold that prefix as soon as
it is prefilled, and a request arriving meanwhile still shares it); when its prefill is
done each key is *anchored* to the KV block holding the last full block of that chunk's
prefix; when that block is evicted from the prefix cache the key is forgotten. A key whose
prompt ends before its prefill (aborted, failed) is forgotten unless another queued prompt
names it. So the set is what the cache truly holds or is about to, whichever gateway sent
the prompt.

Anchoring to the chunk's last block is enough: the cache evicts a freed sequence's blocks
tail first, and a gateway counts only the *leading* keys of a prompt that are present, so
losing an earlier block (and its key) ends the match there.

Changes are numbered and kept in a bounded log for delta reports (strata.prefix_report).
Mutations come from the engine thread, reports from the HTTP thread: one lock.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

from strata.prefix_report import MAX_KEYS, PrefixReport

_SMALL_DELTA = 256

# (routing key, prompt tokens its prefix spans) for one prompt, leading chunk first
RouteKeys = tuple[tuple[int, int], ...]

_QUEUED = b""  # anchor of a key whose prompt is not prefilled yet (no block hash is empty)


class PrefixRegistry:
    """Routing keys held by this replica's prefix cache, with a numbered change log."""

    def __init__(self, block_size: int, capacity: int = 16384, chunk_bytes: int = 0,
                 chunk_tokens: int = 0, log_size: int | None = None) -> None:
        """``capacity`` keys at most (least recently admitted go first); ``log_size``
        changes are kept for deltas (default twice the capacity)."""
        if block_size < 1 or not 1 <= capacity <= MAX_KEYS:
            raise ValueError(f"PrefixRegistry needs block_size >= 1 and 1 <= capacity <= {MAX_KEYS}")
        self.block_size = block_size
        self.capacity = capacity
        self.chunk_bytes = chunk_bytes
        self.chunk_tokens = chunk_tokens
        self.epoch = secrets.token_hex(8)
        self.version = 0
        self._held: OrderedDict[int, bytes] = OrderedDict()  # key -> anchor block hash
        self._by_block: dict[bytes, set[int]] = {}
        self._queued: dict[int, RouteKeys] = {}  # seq_id -> keys awaiting its prefill
        self._queued_refs: dict[int, int] = {}  # key -> queued prompts naming it
        self._log: deque[tuple[int, int, bool]] = deque()  # (version, key, present)
        self._log_size = log_size if log_size is not None else 2 * capacity
        self._log_floor = 0  # a delta can start from any version >= this one
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: int) -> bool:
        return key in self._held

    # -- changes (engine thread) ---------------------------------------------------------

    def admit(self, seq_id: int, keys: RouteKeys) -> None:
        """A prompt with these keys was queued."""
        if not keys:
            return
        with self._lock:
            self._queued[seq_id] = keys
            refs, held = self._queued_refs, self._held
            for key, _ in keys:
                refs[key] = refs.get(key, 0) + 1
                if key in held:
                    held.move_to_end(key)
                else:
                    held[key] = _QUEUED
                    self._record(key, True)
            self._trim()

    def bind(self, seq_id: int, block_hashes: Sequence[bytes]) -> None:
        """The prompt's prefill is done: anchor its keys to the blocks now cached."""
        with self._lock:
            keys = self._queued.pop(seq_id, None)
            if keys is None:
                return
            bs = self.block_size
            for key, tokens in keys:
                self._unref(key)
                n = min(tokens // bs, len(block_hashes))
                if n == 0:  # less than a block, or nothing cached (prefix caching off)
                    if self._held.get(key) == _QUEUED and key not in self._queued_refs:
                        self._remove(key)
                    continue
                anchor = block_hashes[n - 1]
                old = self._held.get(key)
                if old is None:
                    self._held[key] = anchor
                    self._record(key, True)
                elif old != anchor:
                    self._unanchor(key, old)
                    self._held[key] = anchor
                self._by_block.setdefault(anchor, set()).add(key)
            self._trim()

    def release(self, seq_id: int) -> None:
        """The sequence ended; keys it alone had queued (never prefilled) are dropped."""
        with self._lock:
            keys = self._queued.pop(seq_id, None)
            if keys is None:
                return
            for key, _ in keys:
                self._unref(key)
                if self._held.get(key) == _QUEUED and key not in self._queued_refs:
                    self._remove(key)

    def evict(self, block_hashes: Iterable[bytes]) -> None:
        """These blocks left the prefix cache: forget the keys anchored to them."""
        with self._lock:
            for block in block_hashes:
                keys = self._by_block.pop(block, None)
                if not keys:
                    continue
                for key in keys:
                    if self._held.get(key) != block:
                        continue
                    if key in self._queued_refs:
                        self._held[key] = _QUEUED  # a queued prompt will compute it again
                    else:
                        self._remove(key)

    # -- reports (any thread) ------------------------------------------------------------

    def report(self, epoch: str | None, since: int | None) -> PrefixReport:
        """The change since (``epoch``, ``since``) if the log covers it, else the whole set."""
        with self._lock:
            ok = (epoch == self.epoch and since is not None
                  and self._log_floor <= since <= self.version)
            if ok:
                changes: dict[int, bool] = {}
                for version, key, present in reversed(self._log):
                    if version <= since:
                        break
                    changes.setdefault(key, present)
                # A delta longer than the whole set (and than a small body) is sent whole.
                if len(changes) <= max(len(self._held), _SMALL_DELTA):
                    added = tuple(k for k, p in changes.items() if p)
                    removed = tuple(k for k, p in changes.items() if not p)
                    return PrefixReport(self.epoch, self.version, False, added=added,
                                        removed=removed, chunk_bytes=self.chunk_bytes,
                                        chunk_tokens=self.chunk_tokens)
            return PrefixReport(self.epoch, self.version, True, keys=tuple(self._held),
                                chunk_bytes=self.chunk_bytes, chunk_tokens=self.chunk_tokens)

    # -- internals (lock held) -----------------------------------------------------------

    def _record(self, key: int, present: bool) -> None:
        self.version += 1
        log = self._log
        log.append((self.version, key, present))
        if len(log) > self._log_size:
            self._log_floor = log.popleft()[0]

    def _unref(self, key: int) -> None:
        n = self._queued_refs.get(key, 0) - 1
        if n > 0:
            self._queued_refs[key] = n
        else:
            self._queued_refs.pop(key, None)

    def _unanchor(self, key: int, anchor: bytes) -> None:
        keys = self._by_block.get(anchor)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_block[anchor]

    def _remove(self, key: int) -> None:
        anchor = self._held.pop(key)
        if anchor != _QUEUED:
            self._unanchor(key, anchor)
        self._record(key, False)

    def _trim(self) -> None:
        while len(self._held) > self.capacity:
            self._remove(next(iter(self._held)))
