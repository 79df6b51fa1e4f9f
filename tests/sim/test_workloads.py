"""Synthetic routing workloads: the sharing each one promises is in its block ids."""

from __future__ import annotations

import math
from collections import Counter

from strata.sim.workloads import WorkloadOptions, build

OPTS = WorkloadOptions(rate=6.0, duration_s=200.0, seed=3)


def _prefix_of(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) < len(b) and b[:len(a)] == a


def test_every_record_has_one_id_per_block_and_arrives_in_order() -> None:
    for name in ("chat", "unique", "hot"):
        t = build(name, OPTS)
        assert len(t.records) > 100 and t.block_tokens == OPTS.block_tokens
        assert [r.arrival_s for r in t.records] == sorted(r.arrival_s for r in t.records)
        for r in t.records:
            assert len(r.hash_ids) == math.ceil(r.input_tokens / OPTS.block_tokens)
            assert OPTS.output_tokens[0] <= r.output_tokens <= OPTS.output_tokens[1]


def test_chat_shares_system_prompts_and_each_turn_extends_its_history() -> None:
    recs = build("chat", OPTS).records
    first = Counter(r.hash_ids[0] for r in recs)
    assert len(first) <= OPTS.tenants  # every prompt starts with a tenant's system prompt
    assert first.most_common(1)[0][1] > len(recs) / OPTS.tenants  # Zipf: one tenant leads
    ids = [r.hash_ids for r in recs]
    extended = sum(1 for i, a in enumerate(ids) if any(_prefix_of(b, a) for b in ids[:i]))
    # Later turns extend an earlier turn's prompt (its history), beyond the system prompt.
    longest_system = OPTS.system_tokens[1] // OPTS.block_tokens
    assert extended > len(recs) / 3
    assert any(len(a) > longest_system + 2 and any(_prefix_of(b, a) and len(b) > longest_system
                                                    for b in ids[:i])
               for i, a in enumerate(ids))


def test_unique_keeps_arrivals_and_lengths_but_shares_nothing() -> None:
    chat, uniq = build("chat", OPTS).records, build("unique", OPTS).records
    assert [(r.arrival_s, r.input_tokens) for r in chat] == \
        [(r.arrival_s, r.input_tokens) for r in uniq]
    all_ids = [h for r in uniq for h in r.hash_ids]
    assert len(all_ids) == len(set(all_ids))


def test_hot_puts_one_prefix_in_most_requests() -> None:
    recs = build("hot", OPTS).records
    hot_blocks = OPTS.hot_tokens // OPTS.block_tokens
    hot = Counter(r.hash_ids[:hot_blocks] for r in recs if len(r.hash_ids) > hot_blocks)
    prefix, n = hot.most_common(1)[0]
    assert abs(n / len(recs) - OPTS.hot_share) < 0.08
    others = [h for r in recs if r.hash_ids[:hot_blocks] != prefix for h in r.hash_ids]
    assert len(others) == len(set(others))  # the rest share nothing


def test_a_seed_gives_the_same_trace() -> None:
    assert build("chat", OPTS) == build("chat", OPTS)
    assert build("chat", OPTS).records != build("chat", WorkloadOptions(rate=6.0,
                                                                         duration_s=200.0,
                                                                         seed=4)).records
