"""Stage links against hostile peers: a real stage worker and a real head on loopback.

The tail stage (layers 1:2 of the tiny random-weight model) runs as a `StageWorker`
with its HTTP face, the head (layers 0:1) as a `HeadEngine` that connects to it over
the frame transport, both holding one cluster token. Intruders (a wrong token, no
handshake, garbage bytes, a huge length prefix, no token) are refused and the head is
still served afterwards; crafted STEP frames from an authenticated peer with indices
outside the stage's KV cache are answered with ERROR frames and never written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from strata.engine.sampling import SamplingParams
from strata.internal_auth import HEADER
from strata.stages import links
from strata.stages import transport as tp
from strata.stages.head_engine import HeadEngine
from strata.stages.head_server import HeadConfig, build_head, build_head_app
from strata.stages.protocol import NewSeq, StepMessage
from strata.stages.runtime import build_runtime
from strata.stages.transport import Frame, decode_frame, encode_frame
from strata.stages.worker import StageWorker, build_worker_app

TOKEN = "cluster-secret-for-tests"
NUM_BLOCKS, BLOCK, MAX_TOKENS, MAX_SEQS, MAX_LEN = 32, 16, 64, 4, 256
HIDDEN = 64  # the tiny model's hidden size


class _Quiet(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave pytest's signal handlers alone
        yield


@asynccontextmanager
async def _http(app: Any) -> AsyncIterator[str]:
    server = _Quiet(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                   lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done():
            task.result()
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@asynccontextmanager
async def _tail(model: Path, token: str | None = TOKEN,
                max_inbox: int = 64) -> AsyncIterator[tuple[StageWorker, str]]:
    rt = build_runtime(model, "1:2", torch.float32, torch.device("cpu"), 1 << 30)
    worker = StageWorker(rt, "tiny", "127.0.0.1", 0, "", token=token, max_inbox=max_inbox)
    await worker.start()
    try:
        async with _http(build_worker_app(worker)) as url:
            worker.http_url = url
            yield worker, url
    finally:
        await worker.stop()


def _head(model: Path, token: str | None = TOKEN) -> HeadEngine:
    engine = build_head(HeadConfig(
        stages=((0, 1), (1, 2)), model=str(model), dtype="float32", device="cpu", threads=1,
        block_size=BLOCK, num_kv_blocks=NUM_BLOCKS, max_num_seqs=MAX_SEQS,
        max_num_batched_tokens=MAX_TOKENS, max_model_len=MAX_LEN, internal_token=token))
    engine.start()
    return engine


async def _generate(engine: HeadEngine, prompt: list[int]) -> list[int]:
    out: list[int] = []
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    async for o in engine.generate(prompt, params):
        out.extend(o.token_ids)
    return out


async def _raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _raw_frame(reader: asyncio.StreamReader) -> Frame | None:
    try:
        (n,) = struct.unpack("<Q", await asyncio.wait_for(reader.readexactly(8), 10))
        return decode_frame(bytearray(await asyncio.wait_for(reader.readexactly(n), 10)))
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None


async def _closed(reader: asyncio.StreamReader) -> bool:
    """True once the peer hung up (whatever it said before)."""
    try:
        while await asyncio.wait_for(reader.read(1 << 16), 10):
            pass
    except ConnectionResetError:
        pass
    return True


async def test_intruders_are_refused_and_the_real_head_is_still_served(tiny_hf_dir: Path) -> None:
    async with _tail(tiny_hf_dir) as (worker, url):
        engine = _head(tiny_hf_dir)
        try:
            await asyncio.wrap_future(engine.add_replica(url))
            prompt = list(range(5, 25))
            before = await _generate(engine, prompt)
            head_link = worker.head
            port = worker.data_port

            # 1. The right protocol with the wrong token: refused in the handshake.
            with pytest.raises(links.LinkAuthError, match="wrong internal token"):
                await links.connect("127.0.0.1", port, token="not-the-secret", role="head")
            # 2. No token at all against a worker that has one.
            with pytest.raises(links.LinkAuthError, match="requires"):
                await links.connect("127.0.0.1", port, role="head")
            # 3. A head HELLO without the handshake: an ERROR frame, then the link closes.
            r, w = await _raw(port)
            assert (await _raw_frame(r)).kind == tp.AUTH  # type: ignore[union-attr]
            w.writelines(encode_frame(Frame(tp.HELLO, 0, {
                "role": "head", "num_blocks": 1, "block_size": 1, "max_num_batched_tokens": 1,
                "max_num_seqs": 1, "max_model_len": 1})))
            err = await _raw_frame(r)
            assert err is not None and err.kind == tp.ERROR and await _closed(r)
            w.close()
            # 4. Garbage bytes (an HTTP request to the data port).
            r, w = await _raw(port)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await _closed(r)
            w.close()
            # 5. A huge length prefix: refused before anything is allocated.
            r, w = await _raw(port)
            await _raw_frame(r)
            w.write(struct.pack("<Q", 1 << 62))
            err = await _raw_frame(r)
            assert err is not None and "out of bounds" in err.meta["message"] and await _closed(r)
            w.close()

            # None of them touched the head's link or the KV cache it sized.
            assert worker.head is head_link and not head_link.is_closed  # type: ignore[union-attr]
            assert worker.rt.num_blocks == NUM_BLOCKS
            assert await _generate(engine, prompt) == before
        finally:
            engine.stop()


async def test_a_head_without_the_token_cannot_join(tiny_hf_dir: Path) -> None:
    async with _tail(tiny_hf_dir) as (worker, url):
        engine = _head(tiny_hf_dir, token=None)
        try:
            with pytest.raises(links.LinkAuthError, match="requires the cluster's internal token"):
                await asyncio.wrap_future(engine.add_replica(url))
            assert worker.head is None and worker.rt.runner is None
        finally:
            engine.stop()


def _hello() -> Frame:
    return Frame(tp.HELLO, 0, {
        "role": "head", "num_blocks": NUM_BLOCKS, "block_size": BLOCK, "eos_token_ids": [0],
        "max_num_batched_tokens": MAX_TOKENS, "max_num_seqs": MAX_SEQS, "max_model_len": MAX_LEN})


def _prefill(sid: int, t: int = 8) -> StepMessage:
    """A valid STEP for the tail: one new sequence's first t prompt tokens in block 0."""
    return StepMessage(
        hidden=torch.randn(t, HIDDEN), positions=torch.arange(t), slot_mapping=torch.arange(t),
        num_decodes=0, decode_block_tables=torch.zeros((0, 0), dtype=torch.int32),
        decode_lens=torch.zeros(0, dtype=torch.int32), spans=[(0, t, 0)],
        gather_slots=torch.zeros(0, dtype=torch.long), sample_rows=[t - 1],
        sample_seq_ids=[sid], extra_rows=[], seq_ids=[sid], block_size=BLOCK,
        new_seqs={sid: NewSeq(SamplingParams(temperature=0.0), list(range(1, t + 1)), [])})


def _decode(sid: int, table: list[int], length: int, slot: int) -> StepMessage:
    tables = torch.tensor([table], dtype=torch.int32)
    return dataclasses.replace(
        _prefill(sid, 1), positions=torch.tensor([length - 1]), slot_mapping=torch.tensor([slot]),
        num_decodes=1, decode_block_tables=tables,
        decode_lens=torch.tensor([length], dtype=torch.int32), spans=[], sample_rows=[0],
        new_seqs={})


SLOTS = NUM_BLOCKS * BLOCK
BAD_STEPS: dict[str, tuple[StepMessage, str]] = {
    "slot past the cache": (dataclasses.replace(
        _prefill(1), slot_mapping=torch.tensor([0, 1, 2, 3, 4, 5, 6, SLOTS])), "slots"),
    "negative slot": (dataclasses.replace(
        _prefill(1), slot_mapping=torch.tensor([-1, 1, 2, 3, 4, 5, 6, 7])), "slots"),
    "huge slot": (dataclasses.replace(
        _prefill(1), slot_mapping=torch.full((8,), 1 << 40)), "slots"),
    "int32 slots": (dataclasses.replace(
        _prefill(1), slot_mapping=torch.arange(8, dtype=torch.int32)), "slots"),
    "position past max_model_len": (dataclasses.replace(
        _prefill(1), positions=torch.arange(MAX_LEN, MAX_LEN + 8)), "positions"),
    "block table entry past the cache": (_decode(2, [0, NUM_BLOCKS], 20, 19), "dec_tables"),
    "decode length past its table": (_decode(2, [0], 40, 17), "dec_lens"),
    "hidden size": (dataclasses.replace(_prefill(1), hidden=torch.randn(8, HIDDEN + 1)), "hidden"),
    "hidden rows": (dataclasses.replace(_prefill(1), hidden=torch.randn(9, HIDDEN)), "hidden"),
    "integer hidden states": (dataclasses.replace(
        _prefill(1), hidden=torch.zeros(8, HIDDEN, dtype=torch.int64)), "hidden"),
    "spans do not cover the rows": (dataclasses.replace(_prefill(1), spans=[(0, 4, 0)]), "rows"),
    "span past max_model_len": (dataclasses.replace(_prefill(1), spans=[(0, 8, MAX_LEN)]), "span"),
    "gather slots past the cache": (dataclasses.replace(
        _prefill(1), spans=[(0, 8, 2)], gather_slots=torch.tensor([SLOTS] * 10)), "gather"),
    "sample row past the batch": (dataclasses.replace(_prefill(1), sample_rows=[8]), "sample_rows"),
    "too many tokens": (dataclasses.replace(
        _prefill(1, MAX_TOKENS + 1)), "tokens"),
    "block size": (dataclasses.replace(_prefill(1), block_size=BLOCK * 2), "block size"),
}


async def _step(conn: tp.Connection, step_id: int, msg: StepMessage) -> Frame:
    await conn.send(msg.to_frame(step_id))
    reply = await asyncio.wait_for(conn.recv(), 30)
    assert reply is not None and reply.step_id == step_id
    return reply


async def test_crafted_steps_are_refused_and_nothing_is_written(tiny_hf_dir: Path) -> None:
    async with _tail(tiny_hf_dir) as (worker, _url):
        conn = await links.connect("127.0.0.1", worker.data_port, token=TOKEN, role="head")
        await conn.send(_hello())
        assert (await asyncio.wait_for(conn.recv(), 30)).meta["ok"]  # type: ignore[union-attr]
        assert (await _step(conn, 1, _prefill(7))).kind == tp.RESULT
        runner = worker.rt.runner
        assert runner is not None
        kv_before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        for i, (name, (msg, field)) in enumerate(BAD_STEPS.items(), start=100):
            reply = await _step(conn, i, msg)
            assert reply.kind == tp.ERROR, name
            assert field in reply.meta["message"], (name, reply.meta["message"])
        for (k0, v0), (k1, v1) in zip(kv_before, runner.kv_caches, strict=True):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)  # nothing reached the cache
        assert worker.refused_steps == len(BAD_STEPS)
        # The stage serves on: a decode of the first sequence and a new prefill.
        assert (await _step(conn, 2, _decode(7, [0], 9, 8))).kind == tp.RESULT
        assert (await _step(conn, 3, _prefill(8))).kind == tp.RESULT
        conn.close()


async def test_a_frame_above_the_heads_limits_closes_only_that_link(tiny_hf_dir: Path) -> None:
    async with _tail(tiny_hf_dir) as (worker, _url):
        conn = await links.connect("127.0.0.1", worker.data_port, token=TOKEN, role="head")
        await conn.send(_hello())
        await asyncio.wait_for(conn.recv(), 30)
        limit = worker.max_frame_bytes()
        assert conn is not None and limit < 64 << 20  # bounded by the head's batch limits
        rows = limit // (HIDDEN * 4) + 1
        big = dataclasses.replace(_prefill(1), hidden=torch.randn(rows, HIDDEN))
        await conn.send(big.to_frame(5))
        reply = await asyncio.wait_for(conn.recv(), 30)
        assert reply is not None and reply.kind == tp.ERROR and "out of bounds" in reply.meta["message"]
        assert await asyncio.wait_for(conn.recv(), 30) is None
        # A new link from the head is served.
        conn = await links.connect("127.0.0.1", worker.data_port, token=TOKEN, role="head")
        await conn.send(_hello())
        await asyncio.wait_for(conn.recv(), 30)
        assert (await _step(conn, 6, _prefill(2))).kind == tp.RESULT
        conn.close()


async def test_a_full_inbox_pauses_reading_instead_of_growing(tiny_hf_dir: Path) -> None:
    async with _tail(tiny_hf_dir, max_inbox=2) as (worker, _url):
        conn = await links.connect("127.0.0.1", worker.data_port, token=TOKEN, role="head")
        await conn.send(_hello())
        await asyncio.wait_for(conn.recv(), 30)
        gate = asyncio.Event()
        run = worker.rt.run

        def held(msg: StepMessage) -> Any:
            while not gate.is_set():
                time.sleep(0.01)
            return run(msg)

        worker.rt.run = held  # type: ignore[method-assign]
        n = 30
        for i in range(n):
            await conn.send(_prefill(100 + i).to_frame(1000 + i))
        await asyncio.sleep(0.5)
        link = next(c for c in worker.inbound if c is worker.head)
        assert worker.inbox.qsize() <= 2 and link.queued <= link.max_queued
        assert link.reading_paused
        gate.set()
        got = [await asyncio.wait_for(conn.recv(), 60) for _ in range(n)]
        assert [f.step_id for f in got if f is not None] == [1000 + i for i in range(n)]
        assert all(f is not None and f.kind == tp.RESULT for f in got)
        conn.close()


async def test_admin_endpoints_need_the_internal_token(tiny_hf_dir: Path) -> None:
    async with _tail(tiny_hf_dir) as (worker, url):
        engine = _head(tiny_hf_dir)
        try:
            async with _http(build_head_app(engine)) as head_url, httpx.AsyncClient() as http:
                body = {"url": url}
                for path, target in (("/stages/replicas", head_url), ("/stages/replicas/drain", head_url),
                                     ("/drain", head_url), ("/drain", url)):
                    for hdr in ({}, {HEADER: "wrong"}):
                        r = await http.post(target + path, json=body, headers=hdr)
                        assert r.status_code == 401, (target, path, r.text)
                        err = r.json()["error"]
                        assert err["type"] == "authentication_error" and HEADER in err["message"]
                ok = {HEADER: TOKEN}
                r = await http.post(head_url + "/stages/replicas", json=body, headers=ok)
                assert r.status_code == 200, r.text
                assert not worker.draining
                r = await http.post(url + "/drain", headers=ok)
                assert r.status_code == 200 and worker.draining
        finally:
            engine.stop()
