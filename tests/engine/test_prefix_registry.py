"""The engine's prefix registry and its delta protocol, over the real block manager."""

from __future__ import annotations

import pytest

from strata.engine.kv_cache import BlockManager
from strata.engine.prefix_registry import PrefixRegistry
from strata.engine.sampling import SamplingParams
from strata.engine.sequence import Sequence
from strata.gateway.prefix_index import PrefixIndex
from strata.prefix_report import MAX_KEYS, PrefixReport, PrefixReportError

BS = 4  # tokens per KV block


def prefill(bm: BlockManager, reg: PrefixRegistry, seq_id: int, tokens: list[int],
            keys: tuple[tuple[int, int], ...]) -> Sequence:
    """Admit, prefill and commit a prompt as the engine core does, then follow the cache."""
    s = Sequence(seq_id, tokens, SamplingParams())
    reg.admit(seq_id, keys)
    bm.match_prefix(s)
    assert bm.allocate(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)
    follow(bm, reg)
    reg.bind(seq_id, s.block_hashes)
    return s


def follow(bm: BlockManager, reg: PrefixRegistry) -> None:
    assert bm.evicted is not None
    reg.evict(bm.evicted)
    bm.evicted.clear()


def setup(num_blocks: int = 8, **kw: int) -> tuple[BlockManager, PrefixRegistry]:
    bm = BlockManager(num_blocks, BS)
    bm.evicted = []
    return bm, PrefixRegistry(BS, chunk_bytes=256, chunk_tokens=64, **kw)


def test_eviction_of_the_anchor_block_is_reported_as_a_removal() -> None:
    bm, reg = setup(num_blocks=4)
    a = prefill(bm, reg, 1, list(range(8)), ((11, 4), (12, 8)))  # keys end at blocks 0, 1
    bm.free_sequence(a)  # still cached: still held
    first = reg.report(None, None)
    assert first.full and set(first.keys) == {11, 12}
    # A different prompt needs all 4 blocks: both cached ones are evicted.
    b = prefill(bm, reg, 2, list(range(100, 116)), ())
    delta = reg.report(first.epoch, first.version)
    assert not delta.full and set(delta.removed) == {11, 12} and delta.added == ()
    assert len(reg) == 0
    bm.free_sequence(b)


def test_tail_eviction_ends_the_match_at_the_first_missing_key() -> None:
    """The cache evicts a freed prompt's blocks tail first: its last key goes first."""
    bm, reg = setup(num_blocks=4)
    a = prefill(bm, reg, 1, list(range(8)), ((11, 4), (12, 8)))
    bm.free_sequence(a)
    b = prefill(bm, reg, 2, list(range(100, 112)), ())  # 3 blocks: 2 free, 1 evicted
    assert 11 in reg and 12 not in reg
    bm.free_sequence(b)


def test_queued_keys_are_reported_and_dropped_if_never_prefilled() -> None:
    _, reg = setup()
    reg.admit(1, ((21, 64), (22, 128)))
    reg.admit(2, ((21, 64),))
    r0 = reg.report(None, None)
    assert set(r0.keys) == {21, 22}
    reg.release(1)  # aborted before its prefill: 22 goes, 21 is still queued by 2
    d = reg.report(r0.epoch, r0.version)
    assert d.removed == (22,) and d.added == ()
    reg.release(2)
    assert len(reg) == 0


def test_a_key_shorter_than_a_block_or_without_caching_is_not_kept() -> None:
    bm, reg = setup()
    prefill(bm, reg, 1, [1, 2, 3], ((31, 3),))  # no full block holds it
    assert 31 not in reg
    reg.admit(2, ((32, 8),))
    reg.bind(2, [])  # prefix caching off: nothing cached to anchor to
    assert 32 not in reg


def test_a_restart_or_unknown_epoch_gets_the_full_set() -> None:
    _, reg = setup()
    reg.admit(1, ((41, 4),))
    r = reg.report(None, None)
    restarted = PrefixRegistry(BS, chunk_bytes=256, chunk_tokens=64)
    assert restarted.epoch != reg.epoch
    after = restarted.report(r.epoch, r.version)  # the gateway's old epoch
    assert after.full and after.keys == ()
    assert reg.report("other", r.version).full
    assert reg.report(r.epoch, r.version + 5).full  # a version from the future


def test_a_since_older_than_the_log_gets_the_full_set() -> None:
    _, reg = setup(capacity=64, log_size=4)
    reg.admit(1, ((1, 4), (2, 8)))
    r = reg.report(None, None)
    reg.admit(2, ((3, 4), (4, 8), (5, 12)))  # 3 more changes: the log still reaches back
    assert not reg.report(r.epoch, r.version).full
    reg.admit(3, ((6, 4), (7, 8)))  # 5 changes since r: past the 4-entry log
    full = reg.report(r.epoch, r.version)
    assert full.full and set(full.keys) == {1, 2, 3, 4, 5, 6, 7}


def test_capacity_bounds_the_set_oldest_first() -> None:
    _, reg = setup(capacity=3)
    reg.admit(1, ((1, 4), (2, 8)))
    r = reg.report(None, None)
    reg.admit(2, ((3, 4), (4, 8)))
    assert len(reg) == 3 and 1 not in reg
    d = reg.report(r.epoch, r.version)
    assert set(d.added) == {3, 4} and d.removed == (1,)
    with pytest.raises(ValueError, match="capacity"):
        PrefixRegistry(BS, capacity=MAX_KEYS + 1)


def test_a_delta_larger_than_the_set_is_sent_whole() -> None:
    _, reg = setup()
    r = reg.report(None, None)
    for i in range(300):
        reg.admit(i, ((1000 + i, 4),))
        reg.release(i)  # added then removed: 300 changed keys, none held
    reg.admit(99, ((7, 4),))
    assert reg.report(r.epoch, r.version).full


def test_the_gateway_index_follows_the_deltas() -> None:
    """A gateway applying full and delta reports ends with exactly the engine's set."""
    bm, reg = setup(num_blocks=6)
    idx = PrefixIndex(100)
    bm.free_sequence(prefill(bm, reg, 1, list(range(8)), ((11, 4), (12, 8))))
    for t in range(3):
        epoch, since = idx.since()
        assert idx.apply(PrefixReport.from_dict(reg.report(epoch, since).to_dict()), float(t))
        assert idx.reported == {11, 12}
    assert idx.match([11, 12, 13]) == 2
    s = prefill(bm, reg, 2, list(range(100, 124)), ((21, 24),))  # evicts 11 and 12
    epoch, since = idx.since()
    report = reg.report(epoch, since)
    assert not report.full
    idx.apply(report, 3.0)
    assert idx.reported == {21} and idx.match([11, 12]) == 0
    bm.free_sequence(s)
    # A delta that does not follow (another epoch) is refused: the caller asks for all.
    other = PrefixReport("x", 1, False, added=(5,))
    assert not idx.apply(other, 4.0)


def test_local_entries_stand_until_a_later_report() -> None:
    idx = PrefixIndex(100, grace_s=1.0)
    idx.insert([1, 2], now=10.0)
    assert idx.match([1, 2]) == 2  # no report yet: local entries count
    idx.apply(PrefixReport("e", 1, True, keys=()), requested_at=10.5)
    assert idx.match([1, 2]) == 2  # the report may predate the engine's admission
    idx.apply(PrefixReport("e", 2, False), requested_at=11.5)
    assert idx.match([1, 2]) == 0  # a report well after the send does not hold it
    idx.forget_reports()
    assert idx.match([1, 2]) == 2  # a replica that stopped reporting: local model again


@pytest.mark.parametrize("body, why", [
    ([], "object"),
    ({"epoch": "", "version": 1, "full": True}, "epoch"),
    ({"epoch": "e", "version": -1, "full": True}, "version"),
    ({"epoch": "e", "version": 1, "full": "yes"}, "full"),
    ({"epoch": "e", "version": 1, "full": True, "keys": [1 << 32]}, "32-bit"),
    ({"epoch": "e", "version": 1, "full": True, "keys": [True]}, "32-bit"),
    ({"epoch": "e", "version": 1, "full": False, "added": list(range(MAX_KEYS + 1))}, "at most"),
])
def test_report_bodies_are_checked(body: object, why: str) -> None:
    with pytest.raises(PrefixReportError, match=why):
        PrefixReport.from_dict(body)
