from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from strata.gateway.upstream import (
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnreachable,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        srv = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(srv)
        port = srv.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for srv in servers:
        srv.close()


async def test_chunks_arrive_as_sent(server) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request(reader)
        assert req.startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert req.endswith(b'{"a":1}')
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()

    pool = UpstreamPool(await server(handler), 1.0, 5.0)
    resp = await pool.post("/v1/completions", b'{"a":1}')
    assert resp.status == 200 and resp.content_type == b"text/event-stream"
    assert await resp.read() == b"first"  # before the server sent the rest
    release.set()
    assert await resp.read() == b"second"
    assert await resp.read() == b""
    resp.release()
    await pool.close()


async def test_keep_alive_reuses_one_connection(server) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    pool = UpstreamPool(await server(handler), 1.0, 5.0)
    for _ in range(3):
        resp = await pool.post("/x", b"{}")
        assert await resp.read_all(100) == b"ok"
        resp.release()
    assert connections == 1
    await pool.close()


async def test_dead_pooled_connection_is_replaced_transparently(server) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # a second request on this connection: hang up
        writer.close()

    pool = UpstreamPool(await server(handler), 1.0, 5.0)
    for _ in range(2):
        resp = await pool.post("/x", b"{}")
        assert await resp.read_all(100) == b"ok"
        resp.release()
    await pool.close()


async def test_silence_times_out_and_refusal_is_distinct(server) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    pool = UpstreamPool(await server(handler), 1.0, 0.2)
    resp = await pool.post("/x", b"{}")
    with pytest.raises(UpstreamTimeout):
        await resp.read()
    resp.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamUnreachable):
        await UpstreamPool(f"http://127.0.0.1:{port}", 1.0, 1.0).post("/x", b"{}")


async def test_close_hangs_up_and_midstream_death_raises(server) -> None:
    saw_eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
        await writer.drain()
        if await reader.read(1) == b"":
            saw_eof.set()

    pool = UpstreamPool(await server(handler), 1.0, 5.0)
    resp = await pool.post("/x", b"{}")
    assert await resp.read() == b"one"
    resp.close()
    await asyncio.wait_for(saw_eof.wait(), 2.0)

    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
        await writer.drain()
        writer.close()

    pool2 = UpstreamPool(await server(dies), 1.0, 5.0)
    resp = await pool2.post("/x", b"{}")
    assert await resp.read() == b"one"
    with pytest.raises(UpstreamError) as info:
        await resp.read()
    assert not info.value.before_response
    resp.close()
