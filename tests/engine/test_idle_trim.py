"""The engine loop returns freed C-heap pages to the OS once per idle spell.

Without it glibc keeps the pages that each step's prompt-sized buffers were freed into,
and a replica's RSS creeps up over a long soak though no object stays alive.
"""

from __future__ import annotations

import asyncio
import platform
import time
from pathlib import Path

import pytest

from strata.engine.engine import AsyncEngine, EngineConfig, build_engine_core, release_free_memory
from strata.engine.sampling import SamplingParams


async def _one(engine: AsyncEngine) -> None:
    async for out in engine.generate([1, 2, 3, 4, 5], SamplingParams(max_tokens=3, temperature=0.0)):
        if out.finished:
            return


async def _wait_for(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    t = time.monotonic()
    while not pred():
        assert time.monotonic() - t < timeout, "timed out"
        await asyncio.sleep(0.01)


async def test_loop_trims_once_per_idle_spell(tiny_hf_dir: Path) -> None:
    core = build_engine_core(EngineConfig(model=str(tiny_hf_dir), dtype="float32", device="cpu",
                                          threads=1, num_kv_blocks=16))
    engine = AsyncEngine(core)
    engine.idle_trim_s = 0.05
    calls: list[float] = []
    engine.release_memory = lambda: calls.append(time.monotonic()) or True
    engine.start()
    try:
        await asyncio.sleep(0.3)
        assert calls == []  # no work yet: nothing was freed, nothing to trim
        await _one(engine)
        await _wait_for(lambda: len(calls) == 1)
        await asyncio.sleep(0.3)  # still idle: no second walk of the heap
        assert len(calls) == 1
        await _one(engine)
        await _one(engine)
        await _wait_for(lambda: len(calls) == 2)
        await asyncio.sleep(0.2)
        assert len(calls) == 2
    finally:
        engine.stop()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_memory_calls_glibc() -> None:
    assert release_free_memory() is True
