"""A minimal pooled HTTP/1.1 client for the proxy's hot path, on asyncio + httptools.

Why not aiohttp or httpx: the general-purpose clients add a per-request cost that is a
large share of the gateway's whole latency budget (docs/results.md has the comparison). This client does only what proxying needs: POST a body already in bytes, expose the
status, headers and body chunks as they arrive (chunked decoding by httptools, the parser
uvicorn uses), keep connections alive per replica, and close a connection to cancel its
request. Whatever bytes have arrived are handed over together, never held back.

Timeouts, enforced by one timer per response instead of a timer per read: connect
(``connect_timeout_s``); silence (``read_timeout_s``, including the wait for the response
head and the first token), which fails a request only when the pool's ``alive`` check says
the replica stopped answering its probes too, because a non-streaming answer is silent until
it is done and silence alone is not failure; and an optional hard cap on the whole request
(``request_timeout_s``) for operators.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable

import httptools

_HIGH_WATER = 1 << 20  # pause reading from a replica faster than its client
_IDLE_REUSE_S = 4.0  # uvicorn closes idle keep-alive connections after 5 s by default


class UpstreamError(Exception):
    """The connection failed or the replica broke the protocol; ``before_response`` says when."""

    def __init__(self, message: str, *, before_response: bool = False) -> None:
        super().__init__(message)
        self.before_response = before_response


class UpstreamTimeout(UpstreamError):
    """The replica was silent too long (and not known alive), or the request hit its cap."""

    def __init__(self, message: str, *, before_response: bool = False,
                 capped: bool = False) -> None:
        super().__init__(message, before_response=before_response)
        self.capped = capped  # the operator's request_timeout_s, not a replica fault


class UpstreamUnreachable(UpstreamError):
    """The connection could not be opened: the request was never sent (safe to re-send)."""

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message, before_response=True)
        self.refused = refused


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        r = self.response
        if r is None:  # bytes while idle: the server broke the exchange; drop it
            self.close()
            return
        r.last_data = time.monotonic()
        try:
            r.parser.feed_data(data)
        except httptools.HttpParserError as err:
            r.fail(UpstreamError(f"malformed response from replica: {err}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response.fail(UpstreamError(
                f"replica closed the connection ({exc or 'EOF'})",
                before_response=self.response.status == 0))

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """A response being received: status and headers, then body chunks via ``read``."""

    def __init__(self, conn: _Connection, pool: UpstreamPool) -> None:
        self._conn = conn
        self._pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""
        self.last_data = time.monotonic()
        cap = pool.request_timeout_s
        self.deadline = self.last_data + cap if cap is not None else None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._complete = False
        self._keep_alive = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._released = False

    # -- parser callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers.append((name, value))
        if name == b"content-type":
            self.content_type = value.split(b";", 1)[0].strip().lower()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause()
        self._wake()

    def on_message_complete(self) -> None:
        self._keep_alive = self.parser.should_keep_alive()  # the parser resets after this
        self._complete = True
        self._wake()

    # -- consumer side -------------------------------------------------------------------

    def fail(self, err: UpstreamError) -> None:
        """Record a failure for the reader (a complete response ignores a later close)."""
        if not self._complete and self._error is None:
            self._error = err
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _arm_timer(self) -> None:
        loop = asyncio.get_running_loop()
        pool = self._pool
        timeout = pool.read_timeout_s

        def later(delay: float) -> None:
            if self.deadline is not None:
                delay = min(delay, max(0.0, self.deadline - time.monotonic()))
            self._timer = loop.call_later(delay, check)

        def check() -> None:
            if self._complete or self._error is not None or self._released:
                return
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                self.fail(UpstreamTimeout(
                    f"request exceeded request_timeout_s={pool.request_timeout_s:g}",
                    before_response=self.status == 0, capped=True))
                return
            idle = now - self.last_data
            if idle < timeout:
                later(timeout - idle)
            elif pool.alive is not None and pool.alive():
                later(pool.recheck_s)  # still generating: look again soon
            else:
                self.fail(UpstreamTimeout(
                    f"replica silent for {idle:.0f} s and not answering its health checks",
                    before_response=self.status == 0))

        later(timeout)

    async def _wait(self) -> None:
        if self._timer is None:
            self._arm_timer()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def start(self) -> None:
        """Wait for the status line and headers."""
        while self.status == 0:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """All body bytes received so far (waiting for some); b"" once the body is complete."""
        while True:
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    self._conn.resume()
                return data
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()

    @property
    def at_eof(self) -> bool:
        """The whole body has been received and read."""
        return self._complete and not self._chunks

    async def read_all(self, limit: int) -> bytes:
        """The body, up to ``limit`` bytes (for short error bodies)."""
        out = b""
        while len(out) < limit:
            data = await self.read()
            if not data:
                break
            out += data
        return out[:limit]

    def release(self) -> None:
        """Done with the response: keep the connection if it ended cleanly, else close it."""
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
        conn = self._conn
        conn.response = None
        if self._complete and self._error is None and self._keep_alive and not conn.closed:
            self._pool.give_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abort: close the connection, which tells the replica to cancel the request."""
        self._keep_alive = False
        self.release()


class UpstreamPool:
    """Keep-alive connections to one replica."""

    def __init__(self, url: str, connect_timeout_s: float, read_timeout_s: float,
                 max_idle: int = 256, *, alive: Callable[[], bool] | None = None,
                 recheck_s: float = 1.0, request_timeout_s: float | None = None) -> None:
        """``url`` is ``http(s)://host:port`` (no path).

        ``alive`` says whether the replica still answers its probes; past ``read_timeout_s``
        of silence a response fails only when it says no (or is None), looked at again every
        ``recheck_s``. ``request_timeout_s`` caps a whole response (None: no cap).
        """
        scheme, _, rest = url.partition("://")
        hostport = rest.split("/", 1)[0]
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit():
            host, port = hostport, ("443" if scheme == "https" else "80")
        self.host = host.strip("[]")
        self.port = int(port)
        self.ssl = ssl.create_default_context() if scheme == "https" else None
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.alive = alive
        self.recheck_s = recheck_s
        self.request_timeout_s = request_timeout_s
        self.max_idle = max_idle
        self._host_header = hostport.encode()
        self._idle: list[_Connection] = []
        self._closed = False

    def give_back(self, conn: _Connection) -> None:
        """Return a clean connection for reuse."""
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except TimeoutError:
            raise UpstreamUnreachable(f"connect to {self.host}:{self.port} timed out",
                                      refused=False) from None
        except OSError as err:
            raise UpstreamUnreachable(str(err) or type(err).__name__, refused=True) from None
        return conn

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < _IDLE_REUSE_S:
                return conn
            conn.close()
        return None

    async def post(self, path: str, body: bytes, extra_headers: bytes = b""
                   ) -> UpstreamResponse:
        """Send a POST and wait for the response head.

        Raises UpstreamUnreachable when the replica cannot be reached (nothing was sent),
        UpstreamError when the exchange fails before the head (a reused connection that turns out dead
        is retried once on a fresh one, transparently).
        """
        head = (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n%s\r\n" % (path.encode(), self._host_header,
                                                   len(body), extra_headers))
        for attempt in (0, 1):
            conn = self._take_idle() if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            resp = UpstreamResponse(conn, self)
            conn.response = resp
            assert conn.transport is not None
            conn.transport.write(head + body)
            try:
                await resp.start()
                return resp
            except UpstreamError as err:
                resp.close()
                if not (reused and err.before_response and not isinstance(err, UpstreamTimeout)):
                    raise
            except BaseException:
                resp.close()
                raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close idle connections and refuse to pool more (busy ones close on release)."""
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
