"""Length-prefixed binary frames of raw tensor bytes over asyncio TCP.

Hidden states travel stage to stage as their raw bytes: a frame is a fixed header,
one fixed-size descriptor per tensor (name, dtype, shape, byte count), a small JSON
blob for non-tensor metadata (sequence ids, spans) and the tensors' bytes, each
8-byte aligned. Nothing from the network is ever unpickled; the receiver reads a
frame straight into one buffer (``asyncio.BufferedProtocol``) and the tensors are
``torch.frombuffer`` views of it, so receiving copies nothing after the socket.

The length prefix is checked against the link's limit before any buffer is allocated,
and a link holds at most `max_queued` received frames before it stops reading from the
socket (TCP backpressure instead of unbounded memory). Opening and accepting links,
with their authentication, is `strata.stages.links`.

Wire layout (little endian)::

    u64 body_len | header | n x descriptor | meta (utf-8 JSON) | pad | tensor bytes...
    header     = magic "STRF", u8 version, u8 kind, u16 n_tensors, u64 step_id, u32 meta_len
    descriptor = 16s name, u8 dtype code, u8 ndim, u16 0, 4 x u32 shape, u64 offset, u64 nbytes
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MAGIC = b"STRF"
VERSION = 1
MAX_FRAME_BYTES = 1 << 31  # a frame larger than 2 GiB is garbage or an attack
DEFAULT_MAX_QUEUED = 8  # received frames a link buffers before it stops reading
MAX_DIMS = 4
ALIGN = 8

_PREFIX = struct.Struct("<Q")
_HEADER = struct.Struct("<4sBBHQI")
_DESC = struct.Struct("<16sBBH4IQQ")

# Frame kinds.
HELLO = 1  # a peer introduces itself (role, address) on a new connection
STEP = 2  # one micro-batch's hidden states and attention metadata, head -> tail
RESULT = 3  # sampled tokens of one micro-batch, tail -> head
ERROR = 4  # a stage could not run or forward a micro-batch
AUTH = 6  # the link handshake (nonces and proofs); 5 is the stage protocol's CONTROL
KINDS = {HELLO: "hello", STEP: "step", RESULT: "result", ERROR: "error", AUTH: "auth"}

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
    torch.bool: 10,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class FrameError(ValueError):
    """A frame that does not follow the wire format (wrong magic, version, sizes)."""


@dataclass
class Frame:
    """One message: a kind, a step id, small JSON metadata and named tensors."""

    kind: int
    step_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Tensor payload bytes (what the transport's cost is mostly about)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _pad(n: int) -> int:
    return -n % ALIGN


def encode_frame(frame: Frame) -> list[bytes | memoryview]:
    """The frame as buffers to write in order; tensor bytes are views, not copies."""
    meta = json.dumps(frame.meta, separators=(",", ":")).encode()
    descs: list[bytes] = []
    payloads: list[memoryview] = []
    n = len(frame.tensors)
    offset = _HEADER.size + n * _DESC.size + len(meta)
    offset += _pad(offset)
    data_start = offset
    for name, t in frame.tensors.items():
        key = name.encode()
        if len(key) > 16:
            raise FrameError(f"tensor name {name!r} is longer than 16 bytes")
        if t.dtype not in DTYPE_CODES:
            raise FrameError(f"tensor {name!r}: dtype {t.dtype} cannot be sent")
        if t.dim() > MAX_DIMS:
            raise FrameError(f"tensor {name!r}: {t.dim()} dims, at most {MAX_DIMS}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        shape = list(t.shape) + [0] * (MAX_DIMS - t.dim())
        descs.append(
            _DESC.pack(key, DTYPE_CODES[t.dtype], t.dim(), 0, *shape, offset - data_start, nbytes)
        )
        if nbytes:
            payloads.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            pad = _pad(nbytes)
            if pad:
                payloads.append(memoryview(bytes(pad)))
            offset += nbytes + pad
    head = _HEADER.pack(MAGIC, VERSION, frame.kind, n, frame.step_id, len(meta))
    gap = bytes(_pad(_HEADER.size + n * _DESC.size + len(meta)))
    body_len = offset
    return [_PREFIX.pack(body_len), head, *descs, meta, gap, *payloads]


def decode_frame(body: bytearray | memoryview) -> Frame:
    """Parse a frame body (without its length prefix); tensors are views of `body`."""
    if len(body) < _HEADER.size:
        raise FrameError(f"frame of {len(body)} bytes is shorter than its header")
    magic, version, kind, n, step_id, meta_len = _HEADER.unpack_from(body, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: the peer does not speak the stage transport")
    if version != VERSION:
        raise FrameError(f"transport version {version}, this side speaks {VERSION}")
    pos = _HEADER.size
    if pos + n * _DESC.size > len(body):
        raise FrameError(f"frame of {len(body)} bytes cannot hold {n} tensor descriptors")
    descs = []
    for _ in range(n):
        descs.append(_DESC.unpack_from(body, pos))
        pos += _DESC.size
    if pos + meta_len > len(body):
        raise FrameError("frame metadata runs past the frame")
    meta = json.loads(bytes(body[pos : pos + meta_len])) if meta_len else {}
    if not isinstance(meta, dict):
        raise FrameError(f"frame metadata must be a JSON object, got {type(meta).__name__}")
    pos += meta_len
    data_start = pos + _pad(pos)
    tensors: dict[str, torch.Tensor] = {}
    for key, code, ndim, _, d0, d1, d2, d3, off, nbytes in descs:
        name = key.rstrip(b"\0").decode()
        dtype = CODE_DTYPES.get(code)
        if dtype is None:
            raise FrameError(f"tensor {name!r}: unknown dtype code {code}")
        if ndim > MAX_DIMS:
            raise FrameError(f"tensor {name!r}: {ndim} dims")
        shape = (d0, d1, d2, d3)[:ndim]
        numel = 1
        for d in shape:
            numel *= d
        elem = torch.empty((), dtype=dtype).element_size()
        start = data_start + off
        if numel * elem != nbytes or start + nbytes > len(body):
            raise FrameError(f"tensor {name!r}: shape {shape} does not match its {nbytes} bytes")
        if start % elem:
            raise FrameError(f"tensor {name!r}: offset {off} is not aligned to its dtype")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(body, dtype=dtype, offset=start, count=numel)
            tensors[name] = flat.view(shape)
    return Frame(kind, step_id, meta, tensors)


class _FrameProtocol(asyncio.BufferedProtocol):
    """Reads length-prefixed frames into one exact-size buffer each (no copy after recv)."""

    def __init__(self, on_frame: Callable[[Frame], None], on_lost: Callable[[Exception | None], None],
                 max_frame_bytes: int = MAX_FRAME_BYTES):
        self._on_frame = on_frame
        self._on_lost = on_lost
        self.max_frame_bytes = max_frame_bytes
        self._prefix = bytearray(_PREFIX.size)
        self._buf: bytearray = self._prefix
        self._pos = 0
        self._in_body = False
        self.transport: asyncio.Transport | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buf)[self._pos :]

    def buffer_updated(self, nbytes: int) -> None:
        self._pos += nbytes
        if self._pos < len(self._buf):
            return
        if not self._in_body:
            (size,) = _PREFIX.unpack(self._prefix)
            # Checked before allocating: a length prefix alone must not cost memory.
            if not _HEADER.size <= size <= self.max_frame_bytes:
                self._fail(FrameError(
                    f"frame length {size} is out of bounds ({_HEADER.size}..{self.max_frame_bytes})"))
                return
            self._buf, self._pos, self._in_body = bytearray(size), 0, True
            return
        body = self._buf
        self._buf, self._pos, self._in_body = self._prefix, 0, False
        try:
            frame = decode_frame(body)
        except (FrameError, ValueError) as e:
            self._fail(e)
            return
        self._on_frame(frame)

    def _fail(self, err: Exception) -> None:
        """A stream we cannot parse cannot be resynchronised: say why, then close the link."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.pause_reading()
            with contextlib.suppress(OSError, RuntimeError):
                t.writelines(encode_frame(Frame(ERROR, 0, {"message": f"bad frame: {err}"})))
            t.close()  # flushes the ERROR frame, reads nothing more
        self._on_lost(err)
        self._on_lost = lambda _e: None

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()
        self._on_lost(exc)
        self._on_lost = lambda _e: None

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()


class Connection:
    """One TCP link carrying frames both ways; `recv` yields them in arrival order.

    At most `max_queued` received frames wait for `recv`; beyond that the link stops
    reading the socket until the consumer catches up, so a fast sender is slowed by
    TCP flow control instead of filling this process's memory.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES,
                 max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be >= 1")
        self._frames: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.protocol = _FrameProtocol(self._put, self._lost, max_frame_bytes)
        self.max_queued = max_queued
        self._paused = False
        self.peer: str = ""
        self.peer_host: str = ""
        self.peer_role: str = ""  # what the peer said it is in the handshake
        self.bytes_sent = 0

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame body this side accepts (checked on the length prefix)."""
        return self.protocol.max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        self.protocol.max_frame_bytes = value

    @property
    def queued(self) -> int:
        """Received frames waiting for `recv`."""
        return self._frames.qsize()

    @property
    def reading_paused(self) -> bool:
        """True while the link holds back reading (its queue is full)."""
        return self._paused

    def _put(self, frame: Frame) -> None:
        self._frames.put_nowait(frame)
        t = self.protocol.transport
        if self._frames.qsize() >= self.max_queued and not self._paused and t is not None:
            self._paused = True
            t.pause_reading()

    def _lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        self._frames.put_nowait(None)

    @property
    def is_closed(self) -> bool:
        """True once the link broke or was closed."""
        return self.closed.done()

    async def send(self, frame: Frame) -> None:
        """Write a frame, waiting while the peer's receive window is full."""
        if self.is_closed or self.protocol.transport is None:
            raise ConnectionError(f"link to {self.peer or 'peer'} is closed")
        await self.protocol._can_write.wait()
        if self.is_closed:
            raise ConnectionError(f"link to {self.peer or 'peer'} is closed")
        parts = encode_frame(frame)
        self.protocol.transport.writelines(parts)
        self.bytes_sent += sum(len(p) for p in parts)

    async def recv(self) -> Frame | None:
        """The next frame, or None once the link is closed."""
        if self.is_closed and self._frames.empty():
            return None
        frame = await self._frames.get()
        if frame is None:
            self._frames.put_nowait(None)  # keep answering None
        t = self.protocol.transport
        if self._paused and self._frames.qsize() <= self.max_queued // 2 and t is not None:
            self._paused = False
            if not t.is_closing():
                t.resume_reading()
        return frame

    def close(self) -> None:
        """Close the link (pending writes are flushed by the transport)."""
        if self.protocol.transport is not None:
            self.protocol.transport.close()


def split_addr(addr: str) -> tuple[str, int]:
    """'host:port' -> (host, port), failing with a message that names the form."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {addr!r} must look like host:port, e.g. 127.0.0.1:9001")
    return host, int(port)
