"""Synthetic traces with known prompt sharing, for routing experiments (sim and real engines).

Each request carries ``hash_ids``: one id per ``block_tokens`` block of its prompt, equal ids
at equal positions meaning equal content, exactly as the Mooncake trace's ``hash_ids`` do, so
the simulator's prefix cache and the gateway's prefix index see the sharing, and a real
benchmark can turn each id into the same token ids (``block_token_ids``).

- ``chat`` (multi-tenant chat): ``tenants`` system prompts of ``system_tokens`` (drawn once
  per tenant), chosen with Zipf weights ``1/rank``; sessions arrive as a Poisson process and
  each has a geometric number of turns; turn k's prompt is the system prompt plus the whole
  conversation so far (earlier user messages and answers) plus the new user message, so the
  history grows and every turn extends the previous turn's prompt; turns are a think time
  apart. A session ends when its next prompt would pass ``max_prompt_tokens``.
- ``unique`` (no sharing): the chat trace with every block made unique (same arrivals and
  lengths, nothing reusable).
- ``hot`` (one hot prefix): a fraction ``hot_share`` of the requests start with one
  ``hot_tokens`` prefix followed by a unique user part; the rest are unique prompts.

Every length is a whole number of blocks for the shared parts, so block boundaries align.
A real benchmark turns the ids into token ids with ``strata.bench.prompts.PromptSynthesizer``
(the same id gives the same tokens), as it does for the Mooncake trace.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from strata.bench.traces import Trace, TraceRecord


@dataclass(frozen=True)
class WorkloadOptions:
    """Shape of the synthetic workloads (token counts; ``rate`` in requests/s)."""

    rate: float = 4.0
    duration_s: float = 600.0
    block_tokens: int = 64
    tenants: int = 6
    system_tokens: tuple[int, int] = (1024, 2048)
    turns_mean: float = 4.0
    user_tokens: tuple[int, int] = (64, 384)
    output_tokens: tuple[int, int] = (64, 320)
    think_s: float = 30.0
    max_prompt_tokens: int = 6144
    hot_share: float = 0.8
    hot_tokens: int = 2048
    seed: int = 0


def _blocks(tokens: int, block: int) -> int:
    return max(1, math.ceil(tokens / block))


def _round_blocks(tokens: int, block: int) -> int:
    return max(block, tokens // block * block)


class _Ids:
    """Fresh block ids."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def chat(opts: WorkloadOptions) -> Trace:
    """The multi-tenant chat trace (module docstring), ``opts.rate`` requests/s on average."""
    rng = random.Random(opts.seed)
    ids = _Ids()
    bt = opts.block_tokens
    systems = []
    for _ in range(opts.tenants):
        n = _round_blocks(rng.randint(*opts.system_tokens), bt)
        systems.append((n, ids.take(n // bt)))
    weights = [1.0 / (k + 1) for k in range(opts.tenants)]
    session_rate = opts.rate / opts.turns_mean
    out: list[TraceRecord] = []
    t = 0.0
    while True:
        t += rng.expovariate(session_rate)
        if t >= opts.duration_s:
            break
        sys_len, sys_ids = systems[rng.choices(range(opts.tenants), weights)[0]]
        turns = 1
        while rng.random() > 1.0 / opts.turns_mean and turns < 64:
            turns += 1
        conv: list[int] = []  # ids of the conversation's blocks after the system prompt
        conv_tokens = 0
        at = t
        for _ in range(turns):
            user = rng.randint(*opts.user_tokens)
            prompt = sys_len + conv_tokens + user
            if prompt > opts.max_prompt_tokens or at >= opts.duration_s:
                break
            need = _blocks(conv_tokens + user, bt)
            conv.extend(ids.take(need - len(conv)))
            answer = rng.randint(*opts.output_tokens)
            out.append(TraceRecord(at, prompt, answer, tuple(sys_ids + conv[:need])))
            conv_tokens += user + answer
            at += rng.expovariate(1.0 / opts.think_s)
    out.sort(key=lambda r: r.arrival_s)
    return Trace(name="chat", records=tuple(out), block_tokens=bt,
                 transforms=(f"synthetic chat {opts}",))


def unique(opts: WorkloadOptions) -> Trace:
    """The chat trace with nothing shared (module docstring)."""
    base = chat(opts)
    ids = _Ids()
    recs = tuple(TraceRecord(r.arrival_s, r.input_tokens, r.output_tokens,
                             tuple(ids.take(len(r.hash_ids)))) for r in base.records)
    return Trace(name="unique", records=recs, block_tokens=opts.block_tokens,
                 transforms=(f"synthetic unique {opts}",))


def hot(opts: WorkloadOptions) -> Trace:
    """One hot prefix taking ``hot_share`` of the requests (module docstring)."""
    rng = random.Random(opts.seed)
    ids = _Ids()
    bt = opts.block_tokens
    hot_len = _round_blocks(opts.hot_tokens, bt)
    hot_ids = ids.take(hot_len // bt)
    out: list[TraceRecord] = []
    t = 0.0
    lo = opts.system_tokens[0] // 2
    hi = opts.system_tokens[1] + opts.user_tokens[1]
    while True:
        t += rng.expovariate(opts.rate)
        if t >= opts.duration_s:
            break
        answer = rng.randint(*opts.output_tokens)
        if rng.random() < opts.hot_share:
            user = rng.randint(*opts.user_tokens)
            prompt = hot_len + user
            out.append(TraceRecord(t, prompt, answer,
                                   tuple(hot_ids + ids.take(_blocks(user, bt)))))
        else:
            prompt = rng.randint(lo, hi)
            out.append(TraceRecord(t, prompt, answer, tuple(ids.take(_blocks(prompt, bt)))))
    return Trace(name="hot", records=tuple(out), block_tokens=bt,
                 transforms=(f"synthetic hot {opts}",))


WORKLOADS = {"chat": chat, "unique": unique, "hot": hot}


def build(name: str, opts: WorkloadOptions) -> Trace:
    """The named workload."""
    if name not in WORKLOADS:
        raise ValueError(f"workload {name!r}: use one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name](opts)

