"""The framed tensor transport: exact round trips, zero-copy receive, no pickle, bad input."""

from __future__ import annotations

import asyncio
import pickle
import struct

import pytest
import torch

from strata.stages import links
from strata.stages import transport as tp
from strata.stages.transport import Frame, FrameError, decode_frame, encode_frame

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def _body(frame: Frame) -> bytearray:
    data = b"".join(bytes(p) for p in encode_frame(frame))
    (size,) = struct.unpack_from("<Q", data)
    assert size == len(data) - 8
    return bytearray(data[8:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 7), (2, 0, 4), (2, 3, 4, 5)])
def test_round_trip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _tensor(dtype, shape)
    out = decode_frame(_body(Frame(tp.STEP, 42, {"k": [1, 2]}, {"x": t})))
    assert out.kind == tp.STEP and out.step_id == 42 and out.meta == {"k": [1, 2]}
    got = out.tensors["x"]
    assert got.dtype == dtype and tuple(got.shape) == shape
    assert torch.equal(got, t)


def test_several_tensors_non_contiguous_and_views_share_the_buffer() -> None:
    a = torch.randn(6, 8)[:, ::2]  # non-contiguous: sent as its contiguous copy
    b = torch.arange(5, dtype=torch.int64)
    c = torch.randn(3, dtype=torch.bfloat16)
    body = _body(Frame(tp.RESULT, 1, {}, {"a": a, "b": b, "c": c}))
    out = decode_frame(body)
    assert torch.equal(out.tensors["a"], a) and torch.equal(out.tensors["b"], b)
    assert torch.equal(out.tensors["c"], c)
    # Zero copy: the tensors are views of the received buffer.
    body_addr = torch.frombuffer(body, dtype=torch.uint8).data_ptr()
    for t in out.tensors.values():
        assert body_addr <= t.data_ptr() < body_addr + len(body)
        assert t.data_ptr() % tp.ALIGN == body_addr % tp.ALIGN


def test_decoding_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("pickle used on network data")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    out = decode_frame(_body(Frame(tp.STEP, 3, {"a": 1}, {"h": torch.randn(4, 576)})))
    assert out.tensors["h"].shape == (4, 576)


def test_malformed_frames_fail_loudly() -> None:
    good = _body(Frame(tp.STEP, 1, {}, {"x": torch.randn(4)}))
    bad_magic = bytearray(good)
    bad_magic[:4] = b"XXXX"
    with pytest.raises(FrameError, match="magic"):
        decode_frame(bad_magic)
    with pytest.raises(FrameError):
        decode_frame(good[:-4])  # payload cut short
    many = bytearray(good)
    many[6:8] = struct.pack("<H", 65535)  # descriptors past the end of the frame
    with pytest.raises(FrameError, match="descriptors"):
        decode_frame(many)
    listy = _body(Frame(tp.STEP, 1, [1, 2], {}))  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="JSON object"):
        decode_frame(listy)
    with pytest.raises(FrameError, match="16 bytes"):
        encode_frame(Frame(tp.STEP, 1, {}, {"a_very_long_tensor_name": torch.zeros(1)}))
    with pytest.raises(FrameError, match="dtype"):
        encode_frame(Frame(tp.STEP, 1, {}, {"z": torch.zeros(1, dtype=torch.complex64)}))


async def test_tcp_link_both_ways_in_order() -> None:
    received: list[Frame] = []

    async def echo(conn: tp.Connection) -> None:
        while (f := await conn.recv()) is not None:
            f.tensors = {k: v * 2 if v.dtype.is_floating_point else v for k, v in f.tensors.items()}
            await conn.send(f)

    server = await links.serve("127.0.0.1", 0, echo)
    port = server.sockets[0].getsockname()[1]
    conn = await links.connect("127.0.0.1", port)
    big = torch.randn(3000, 576)  # ~7 MB: exercises partial reads and write back-pressure
    for i in range(5):
        await conn.send(Frame(tp.STEP, i, {"i": i}, {"h": big + i, "ids": torch.arange(i)}))
    for _ in range(5):
        f = await asyncio.wait_for(conn.recv(), timeout=30)
        assert f is not None
        received.append(f)
    assert [f.step_id for f in received] == list(range(5))
    for i, f in enumerate(received):
        assert torch.equal(f.tensors["h"], (big + i) * 2)
        assert torch.equal(f.tensors["ids"], torch.arange(i))
    conn.close()
    server.close()


async def test_closed_link_reports_none_and_refuses_sends() -> None:
    async def close_at_once(conn: tp.Connection) -> None:
        conn.close()

    server = await links.serve("127.0.0.1", 0, close_at_once)
    port = server.sockets[0].getsockname()[1]
    conn = await links.connect("127.0.0.1", port)
    assert await asyncio.wait_for(conn.recv(), timeout=10) is None
    assert conn.is_closed
    with pytest.raises(ConnectionError):
        await conn.send(Frame(tp.STEP, 1))
    server.close()


async def _raw_frame(reader: asyncio.StreamReader) -> Frame | None:
    """Read one frame from a plain socket (a peer that does not use the transport)."""
    try:
        (n,) = struct.unpack("<Q", await reader.readexactly(8))
        return decode_frame(bytearray(await reader.readexactly(n)))
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None


def _never_called() -> tuple[list[tp.Connection], object]:
    reached: list[tp.Connection] = []

    async def handler(conn: tp.Connection) -> None:
        reached.append(conn)

    return reached, handler


async def test_oversized_length_prefix_before_the_handshake_is_refused_unallocated() -> None:
    reached, handler = _never_called()
    server = await links.serve("127.0.0.1", 0, handler)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    challenge = await asyncio.wait_for(_raw_frame(reader), timeout=10)
    assert challenge is not None and challenge.kind == tp.AUTH
    writer.write(struct.pack("<Q", 1 << 40))
    await writer.drain()
    err = await asyncio.wait_for(_raw_frame(reader), timeout=10)
    assert err is not None and err.kind == tp.ERROR and "out of bounds" in err.meta["message"]
    assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # the server hung up
    assert not reached
    writer.close()
    server.close()


async def test_oversized_frame_after_the_handshake_closes_the_link() -> None:
    seen: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def hold(conn: tp.Connection) -> None:
        frame = await conn.recv()
        seen.set_result((frame, conn.closed.result()))

    server = await links.serve("127.0.0.1", 0, hold, max_frame_bytes=4096)
    port = server.sockets[0].getsockname()[1]
    conn = await links.connect("127.0.0.1", port)
    await conn.send(Frame(tp.STEP, 1, {}, {"h": torch.zeros(2048)}))  # 8 KiB of payload
    frame, err = await asyncio.wait_for(seen, timeout=10)
    assert frame is None and isinstance(err, FrameError)
    reply = await asyncio.wait_for(conn.recv(), timeout=10)
    assert reply is not None and reply.kind == tp.ERROR and "4096" in reply.meta["message"]
    assert await asyncio.wait_for(conn.recv(), timeout=10) is None
    server.close()


async def _echo(conn: tp.Connection) -> None:
    while (f := await conn.recv()) is not None:
        await conn.send(f)


async def test_shared_token_authenticates_both_ends() -> None:
    roles: list[str] = []

    async def handler(conn: tp.Connection) -> None:
        roles.append(conn.peer_role)
        await _echo(conn)

    server = await links.serve("127.0.0.1", 0, handler, token="s3cret")
    port = server.sockets[0].getsockname()[1]
    conn = await links.connect("127.0.0.1", port, token="s3cret", role="head")
    await conn.send(Frame(tp.HELLO, 7, {"x": 1}))
    back = await asyncio.wait_for(conn.recv(), timeout=10)
    assert back is not None and back.step_id == 7 and roles == ["head"]
    conn.close()
    server.close()


@pytest.mark.parametrize(("server_token", "client_token", "match"), [
    ("s3cret", "wrong", "wrong internal token"),
    ("s3cret", None, "requires the cluster's internal token"),
    (None, "s3cret", "without an internal token"),
])
async def test_mismatched_tokens_are_refused_before_any_frame(
    server_token: str | None, client_token: str | None, match: str
) -> None:
    reached, handler = _never_called()
    server = await links.serve("127.0.0.1", 0, handler, token=server_token)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(links.LinkAuthError, match=match):
        await links.connect("127.0.0.1", port, token=client_token, role="head")
    await asyncio.sleep(0.05)
    assert not reached
    server.close()


async def test_a_frame_instead_of_the_handshake_is_refused() -> None:
    reached, handler = _never_called()
    server = await links.serve("127.0.0.1", 0, handler, token="s3cret")
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await asyncio.wait_for(_raw_frame(reader), timeout=10)).kind == tp.AUTH  # type: ignore[union-attr]
    writer.writelines(encode_frame(Frame(tp.HELLO, 0, {"role": "head", "num_blocks": 1})))
    await writer.drain()
    err = await asyncio.wait_for(_raw_frame(reader), timeout=10)
    assert err is not None and err.kind == tp.ERROR and "handshake" in err.meta["message"]
    assert await asyncio.wait_for(reader.read(), timeout=10) == b""
    assert not reached
    writer.close()
    server.close()


async def test_a_silent_peer_is_dropped_after_the_handshake_timeout() -> None:
    reached, handler = _never_called()
    server = await links.serve("127.0.0.1", 0, handler, token="s3cret", handshake_timeout_s=0.3)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await asyncio.wait_for(_raw_frame(reader), timeout=10)).kind == tp.AUTH  # type: ignore[union-attr]
    err = await asyncio.wait_for(_raw_frame(reader), timeout=10)
    assert err is not None and err.kind == tp.ERROR and "no handshake" in err.meta["message"]
    assert not reached
    writer.close()
    server.close()


async def test_without_a_token_only_loopback_peers_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    reached, handler = _never_called()
    server = await links.serve("127.0.0.1", 0, handler)
    port = server.sockets[0].getsockname()[1]
    # Every test peer is on loopback: make the listener see this one as remote.
    monkeypatch.setattr(links, "is_loopback", lambda host: False)
    with pytest.raises(links.LinkAuthError, match="loopback peers only"):
        await links.connect("127.0.0.1", port)
    assert not reached
    server.close()


async def test_a_full_link_stops_reading_until_the_consumer_catches_up() -> None:
    accepted: list[tp.Connection] = []
    go = asyncio.Event()

    async def slow(conn: tp.Connection) -> None:
        accepted.append(conn)
        await go.wait()

    server = await links.serve("127.0.0.1", 0, slow, token="t", max_queued=4)
    port = server.sockets[0].getsockname()[1]
    conn = await links.connect("127.0.0.1", port, token="t")
    for i in range(40):
        await conn.send(Frame(tp.STEP, i, {}, {"h": torch.full((256,), float(i))}))
    await asyncio.sleep(0.3)
    (link,) = accepted
    assert link.reading_paused and link.queued == 4  # the rest waits in the sockets
    got = []
    for _ in range(40):
        f = await asyncio.wait_for(link.recv(), timeout=10)
        assert f is not None and link.queued <= 4
        got.append(f.step_id)
    assert got == list(range(40))
    go.set()
    conn.close()
    server.close()


async def test_idle_unauthenticated_links_are_capped() -> None:
    reached, handler = _never_called()
    server = await links.serve("127.0.0.1", 0, handler, token="t", max_pending_handshakes=3)
    port = server.sockets[0].getsockname()[1]
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for r, _w in idle:
        assert (await asyncio.wait_for(_raw_frame(r), timeout=10)).kind == tp.AUTH  # type: ignore[union-attr]
    r4, w4 = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(_raw_frame(r4), timeout=10) is None  # closed at once
    for _r, w in idle:
        w.close()
    await asyncio.sleep(0.1)
    conn = await links.connect("127.0.0.1", port, token="t")  # room again
    await asyncio.sleep(0.05)
    assert len(reached) == 1
    conn.close()
    w4.close()
    server.close()
