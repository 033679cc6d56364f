"""A lean asyncio HTTP/1.1 client for load generation: keep-alive connection pool,
chunked transfer decoding (httptools' C parser), callbacks instead of per-chunk tasks.

Why not httpx: it saturates a core at ~64 concurrent streams on our machines
(benchmarks/README.md), so it measures itself, not the server. Here a response is
delivered to a `ResponseSink` synchronously from `data_received`, stamped once per
socket read; the request coroutine wakes up once, when the response is complete.
Nothing in the per-chunk path allocates a task or a future.

The stamp: on Linux, plain-http connections read with recvmsg() and SO_TIMESTAMPNS,
so each read carries the kernel's receive time of its last segment (converted to the
perf_counter clock). When a server's batched step sends a burst of chunks to hundreds
of streams at once, this process reads them one after another (~20 us each); a
stamp taken at the read would charge the last of a burst with the wait behind the
others, the kernel's is when the bytes actually arrived. Elsewhere (https, other
systems) the stamp is time.perf_counter() at the read.

What this module does NOT know: JSON, SSE, OpenAI, or what the caller measures.
Out of scope on purpose: redirects, cookies, proxies, compression, HTTP/2.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import sys
import time
from typing import Protocol
from urllib.parse import urlsplit

import httptools


class ResponseSink(Protocol):
    """Receives one response as it arrives. `t` is time.perf_counter() at the socket read."""

    def on_headers(self, status: int, headers: list[tuple[bytes, bytes]], t: float) -> None: ...
    def on_body(self, data: bytes, t: float) -> None: ...
    def on_complete(self, t: float) -> None: ...


class HTTPError(Exception):
    """A transport failure: connect refused, connection lost mid-response, timeout, bad HTTP."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind  # "connect" | "disconnect" | "timeout" | "protocol"
        self.sent_at: float | None = None  # perf_counter time the request was written, if it was


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._sink: ResponseSink | None = None
        self._done: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._now = 0.0
        self.got_bytes = False
        self._has_headers = False
        self._until_close = False  # neither content-length nor chunked: body ends at EOF
        self.is_open = False

    # -- used by the pool -----------------------------------------------------------
    def start(self, data: bytes, sink: ResponseSink, done: asyncio.Future[None]) -> None:
        assert self._transport is not None
        self._sink, self._done = sink, done
        self._headers, self._has_headers, self._until_close, self.got_bytes = [], False, False, False
        self._transport.write(data)

    def abort(self) -> None:
        self.is_open = False
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.is_open = True

    def data_received(self, data: bytes, t: float | None = None) -> None:
        self._now = time.perf_counter() if t is None else t
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(HTTPError("protocol", str(e)))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        if self._done is None or self._done.done():
            return
        if self._has_headers and self._until_close and self._sink is not None:
            self._sink.on_complete(time.perf_counter())
            self._finish()
        else:
            self._fail(HTTPError("disconnect", f"connection closed mid-response ({exc or 'EOF'})"))

    # -- httptools callbacks ----------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._has_headers = True
        names = {n for n, _ in self._headers}
        self._until_close = b"content-length" not in names and b"transfer-encoding" not in names
        if self._sink is not None:
            self._sink.on_headers(self._parser.get_status_code(), self._headers, self._now)

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            self._sink.on_body(body, self._now)

    def on_message_complete(self) -> None:
        if self._sink is not None:
            self._sink.on_complete(self._now)
        if not self._parser.should_keep_alive():
            self.is_open = False
            if self._transport is not None:
                self._transport.close()
        self._finish()

    def _finish(self) -> None:
        done, self._done, self._sink = self._done, None, None
        self._pool._release(self)
        if done is not None and not done.done():
            done.set_result(None)

    def _fail(self, err: HTTPError) -> None:
        done, self._done, self._sink = self._done, None, None
        self.is_open = False
        if done is not None and not done.done():
            done.set_exception(err)


# SO_TIMESTAMPNS (SO_TIMESTAMPNS_OLD, 35 on Linux); Python's socket module lacks the name.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)
# NOTE: one receive buffer for every connection (reads copy out of it at once):
# recvmsg(size) would allocate `size` bytes per read, which costs more than the read.
_BUF = bytearray(256 * 1024)
_BUFS = [_BUF]
_VIEW = memoryview(_BUF)
_CMSG_SIZE = socket.CMSG_SPACE(16)
_unpack_ts = struct.Struct("qq").unpack_from


class _StampedSocket:
    """A plain-TCP transport for `_Connection` that reads with recvmsg() and hands
    each read to the protocol with the kernel's receive timestamp (SO_TIMESTAMPNS).
    Only what `_Connection` uses: write, close, abort; connection_lost on EOF/error."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: _Connection) -> None:
        self._loop, self._sock, self._protocol = loop, sock, protocol
        self._fd = sock.fileno()
        self._out = bytearray()
        self._closed = False
        loop.add_reader(self._fd, self._read)
        protocol.connection_made(self)  # type: ignore[arg-type]

    def _read(self) -> None:
        try:
            n, anc, _, _ = self._sock.recvmsg_into(_BUFS, _CMSG_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._close(e)
            return
        if not n:
            self._close(None)
            return
        data = _VIEW[:n].tobytes()
        now = time.perf_counter()
        t = now
        if anc:
            sec, ns = _unpack_ts(anc[0][2])
            # realtime -> perf_counter: the offset read now, so clock slewing cannot accumulate
            t = min(now, sec + ns * 1e-9 - (time.time() - now))
        self._protocol.data_received(data, t)

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._out:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._close(e)
                return
            if n == len(data):
                return
            data = data[n:]
            self._loop.add_writer(self._fd, self._flush)
        self._out += data

    def _flush(self) -> None:
        try:
            n = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._close(e)
            return
        del self._out[:n]
        if not self._out:
            self._loop.remove_writer(self._fd)

    def close(self) -> None:
        self._close(None)

    def abort(self) -> None:
        self._close(None)

    def _close(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._out:
            self._loop.remove_writer(self._fd)
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


class ConnectionPool:
    """Keep-alive connections to one origin (scheme://host:port), opened on demand.

    `request` sends one request and returns when its response is complete; the
    response itself goes to the sink. Connections are reused LIFO.
    """

    def __init__(self, base_url: str, *, connect_timeout: float = 10.0, kernel_stamps: bool = True) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https"):
            raise ValueError(f"only http:// and https:// URLs are supported, got {base_url!r}")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.base_path = u.path.rstrip("/")
        self.host_header = u.netloc.rsplit("@", 1)[-1]
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if u.scheme == "https" else None
        self._idle: list[_Connection] = []
        self._connect_timeout = connect_timeout
        self.num_connects = 0
        self.kernel_stamps = self._ssl is None and _SO_TIMESTAMPNS is not None and kernel_stamps

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self.kernel_stamps:
                    conn = await self._connect_stamped(loop)
                else:
                    _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port,
                                                           ssl=self._ssl)
        except (OSError, TimeoutError) as e:
            raise HTTPError("connect", f"{self.host}:{self.port}: {e or type(e).__name__}") from None
        self.num_connects += 1
        return conn

    async def _connect_stamped(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        err: OSError | None = None
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)  # type: ignore[arg-type]
                await loop.sock_connect(sock, addr)
            except OSError as e:
                sock.close()
                err = e
                continue
            except BaseException:
                sock.close()
                raise
            conn = _Connection(self)
            _StampedSocket(loop, sock, conn)
            return conn
        raise err or OSError(f"no address for {self.host}")

    def _release(self, conn: _Connection) -> None:
        if conn.is_open:
            self._idle.append(conn)

    def encode(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> bytes:
        """The request bytes (call once per request; cheap)."""
        lines = [f"{method} {self.base_path}{path} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + body if body is not None else head

    async def request(self, data: bytes, sink: ResponseSink, timeout: float | None = None) -> float:
        """Send pre-encoded request bytes; return the perf_counter time they were written.

        Raises HTTPError on a transport failure or when `timeout` seconds pass first.
        """
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            conn = None
            while self._idle:
                conn = self._idle.pop()
                if conn.is_open:
                    break
                conn = None
            is_reused = conn is not None
            if conn is None:
                conn = await self._connect()
            done: asyncio.Future[None] = loop.create_future()
            timer = None
            if timeout is not None:
                timer = loop.call_later(timeout, _expire, conn, done, timeout)
            t_sent = time.perf_counter()
            conn.start(data, sink, done)
            try:
                await done
                return t_sent
            except HTTPError as e:
                # NOTE: a kept-alive connection the server closed while idle fails before
                # any byte of the response; that request never reached the server, so it
                # is sent once more on a fresh connection.
                if attempt == 0 and is_reused and e.kind == "disconnect" and not conn.got_bytes:
                    continue
                e.sent_at = t_sent
                raise
            except asyncio.CancelledError:
                conn.abort()  # a half-read response cannot be reused
                raise
            finally:
                if timer is not None:
                    timer.cancel()
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._idle.clear()


class BufferSink:
    """Collects a whole response (for small control calls: /v1/models, /tokenize)."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    def on_headers(self, status: int, headers: list[tuple[bytes, bytes]], t: float) -> None:
        self.status, self.headers = status, headers

    def on_body(self, data: bytes, t: float) -> None:
        self.body += data

    def on_complete(self, t: float) -> None:
        pass


async def fetch(pool: ConnectionPool, method: str, path: str, headers: dict[str, str], body: bytes | None = None,
                timeout: float = 60.0) -> BufferSink:
    """One small request, whole response in memory."""
    sink = BufferSink()
    await pool.request(pool.encode(method, path, headers, body), sink, timeout)
    return sink


def _expire(conn: _Connection, done: asyncio.Future[None], timeout: float) -> None:
    if not done.done():
        done.set_exception(HTTPError("timeout", f"no complete response after {timeout:g} s"))
        conn.abort()
