"""The framed tensor transport: exact round trips, zero-copy receive, no pickle, bad input."""

from __future__ import annotations

import asyncio
import pickle
import struct

import pytest
import torch

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

    server = await tp.serve("127.0.0.1", 0, echo)
    port = server.sockets[0].getsockname()[1]
    conn = await tp.connect("127.0.0.1", port)
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

    server = await tp.serve("127.0.0.1", 0, close_at_once)
    port = server.sockets[0].getsockname()[1]
    conn = await tp.connect("127.0.0.1", port)
    assert await asyncio.wait_for(conn.recv(), timeout=10) is None
    assert conn.is_closed
    with pytest.raises(ConnectionError):
        await conn.send(Frame(tp.STEP, 1))
    server.close()


async def test_oversized_length_prefix_closes_the_link() -> None:
    seen: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def hold(conn: tp.Connection) -> None:
        frame = await conn.recv()
        seen.set_result((frame, conn.closed.result()))

    server = await tp.serve("127.0.0.1", 0, hold)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(struct.pack("<Q", 1 << 40))
    await writer.drain()
    frame, err = await asyncio.wait_for(seen, timeout=10)
    assert frame is None and isinstance(err, FrameError)
    assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # the server hung up
    writer.close()
    server.close()
