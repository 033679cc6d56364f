"""An OpenAI-compatible stand-in server with programmed timing and fake tokens (no
model): for testing the bench and measuring the client's own overhead.

Each request gets `max_tokens` tokens of " tok": the first after `ttft_ms`, then one
every `itl_ms` (each stream on its own timer, as a real server's streams would be
staggered). With `stamp`, every chunk carries `"ts"`: time.perf_counter() at its write
(CLOCK_MONOTONIC, comparable across processes on Linux), so a client can measure how
late it sees each chunk. Knobs for parser tests: CRLF line ends, comment lines,
`event:` lines, each event split over two writes, Server-Timing and usage.timings.
/tokenize counts whitespace-separated words (+1 per chat message).

    python -m scalellm.bench.standin --port 0 --ttft-ms 50 --itl-ms 10

prints `port N` on stdout once it listens. Serves HTTP/1.1 keep-alive with chunked
transfer encoding. What this module does NOT know: models, tokenizers, the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

import httptools
import msgspec


@dataclass(frozen=True)
class StandinConfig:
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    model: str = "standin"
    is_crlf: bool = False  # SSE lines end in CRLF
    has_comments: bool = False  # ": ping" comment lines and "event: message" lines
    is_split: bool = False  # every SSE event written in two pieces
    has_timings: bool = False  # Server-Timing header + usage.timings
    stamp: bool = False  # "ts" (perf_counter at write) in every chunk


_encode = msgspec.json.encode


class _Request(msgspec.Struct):
    max_tokens: int | None = 16
    max_completion_tokens: int | None = None
    stream: bool = False
    prompt: str | list | None = None
    messages: list[dict] | None = None
    stream_options: dict | None = None


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Conn(asyncio.Protocol):
    def __init__(self, cfg: StandinConfig) -> None:
        self.cfg = cfg
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body = bytearray()
        self.loop = asyncio.get_running_loop()
        self.nl = b"\r\n" if cfg.is_crlf else b"\n"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        url, body = self.url, bytes(self.body)
        self.url, self.body = b"", bytearray()
        method = self.parser.get_method()
        if url.endswith(b"/completions") and method == b"POST":
            self._generate(body, is_chat=url.endswith(b"/chat/completions"))
        elif url == b"/tokenize" and method == b"POST":
            req = msgspec.json.decode(body)
            if req.get("messages") is not None:
                n = sum(len(str(m.get("content", "")).split()) + 1 for m in req["messages"]) + 1
            else:
                n = len(str(req.get("prompt", "")).split()) + (1 if req.get("add_special_tokens", True) else 0)
            self._json(200, {"tokens": list(range(n)), "count": n})
        elif url in (b"/health", b"/ready"):
            self._json(200, {"status": "ok"})
        elif url == b"/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.cfg.model, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {url.decode()}", "type": "invalid_request_error"}})

    # -- responses ---------------------------------------------------------------------
    def _json(self, status: int, obj: object, extra: bytes = b"") -> None:
        assert self.transport is not None
        data = _encode(obj)
        self.transport.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                             % (status, len(data), extra, data))

    def _generate(self, body: bytes, is_chat: bool) -> None:
        try:
            req = msgspec.json.decode(body, type=_Request)
        except msgspec.DecodeError as e:
            self._json(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
            return
        n = req.max_completion_tokens or req.max_tokens or 16
        # the same count /tokenize gives: words + 1 (BOS); chat: + 1 per message + 1
        num_prompt = len(str(req.prompt or "").split()) + 1 if not is_chat else sum(
            len(str(m.get("content", "")).split()) + 1 for m in (req.messages or [])) + 1
        t0 = time.perf_counter()
        if not req.stream:
            delay = (self.cfg.ttft_ms + self.cfg.itl_ms * (n - 1)) / 1e3
            self.loop.call_later(delay, self._whole, is_chat, n, num_prompt, t0)
            return
        assert self.transport is not None
        timing = b""
        if self.cfg.has_timings:
            timing = b"server-timing: gateway;dur=0.5, queue;dur=1.0\r\n"
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                             b"%s\r\n" % timing)
        include_usage = bool(req.stream_options and req.stream_options.get("include_usage"))
        if self.cfg.has_comments:
            self._event(b": ping" + self.nl + self.nl)
        _Stream(self, is_chat, n, num_prompt, include_usage, t0).start()

    def _whole(self, is_chat: bool, n: int, num_prompt: int, t0: float) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        text = " tok" * n
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if is_chat else {"index": 0, "text": text}
        usage: dict = {"prompt_tokens": num_prompt, "completion_tokens": n, "total_tokens": num_prompt + n}
        if self.cfg.has_timings:
            usage["timings"] = _timings(self.cfg, n, t0)
        self._json(200, {"id": "x", "object": "chat.completion" if is_chat else "text_completion", "model":
                         self.cfg.model, "choices": [{**choice, "finish_reason": "length"}], "usage": usage},
                   b"server-timing: gateway;dur=0.5\r\n" if self.cfg.has_timings else b"")

    def _event(self, data: bytes) -> None:
        assert self.transport is not None
        if self.cfg.is_split and len(data) > 4:
            half = len(data) // 2
            self.transport.write(_chunk(data[:half]))
            self.transport.write(_chunk(data[half:]))
        else:
            self.transport.write(_chunk(data))


def _timings(cfg: StandinConfig, n: int, t0: float) -> dict[str, float]:
    total = (time.perf_counter() - t0) * 1e3
    return {"gateway_ms": 0.5, "queue_ms": 1.0, "prefill_ms": cfg.ttft_ms, "decode_ms": cfg.itl_ms * (n - 1),
            "total_ms": total}


class _Stream:
    """One streamed response, one timer per token."""

    def __init__(self, conn: _Conn, is_chat: bool, n: int, num_prompt: int, include_usage: bool, t0: float) -> None:
        self.conn, self.is_chat, self.n, self.num_prompt, self.include_usage, self.t0 = (
            conn, is_chat, n, num_prompt, include_usage, t0)
        self.i = 0
        nl = conn.nl
        self.pre = (b"event: message" + nl if conn.cfg.has_comments else b"") + b"data: "
        self.post = nl + nl
        kind = b"chat.completion.chunk" if is_chat else b"text_completion"
        self.head = b'{"id":"x","object":"%s","model":"%s","choices":[' % (kind, conn.cfg.model.encode())

    def start(self) -> None:
        delay = self.conn.cfg.ttft_ms / 1e3
        if delay > 0:
            self.conn.loop.call_later(delay, self._tick)
        else:
            self._tick()

    def _tick(self) -> None:
        conn = self.conn
        if conn.transport is None or conn.transport.is_closing():
            return
        itl = conn.cfg.itl_ms / 1e3
        while True:
            self.i += 1
            last = self.i == self.n
            if self.is_chat:
                delta = b'{"role":"assistant","content":" tok"}' if self.i == 1 else b'{"content":" tok"}'
                choice = b'{"index":0,"delta":%s,"finish_reason":%s}' % (delta, b'"length"' if last else b"null")
            else:
                choice = b'{"index":0,"text":" tok","finish_reason":%s}' % (b'"length"' if last else b"null")
            stamp = b',"ts":%.6f' % time.perf_counter() if conn.cfg.stamp else b""
            conn._event(self.pre + self.head + choice + b"]" + stamp + b"}" + self.post)
            if last:
                self._finish()
                return
            if itl > 0:
                conn.loop.call_later(itl, self._tick)
                return

    def _finish(self) -> None:
        conn = self.conn
        assert conn.transport is not None
        if self.include_usage:
            usage: dict = {"prompt_tokens": self.num_prompt, "completion_tokens": self.n,
                           "total_tokens": self.num_prompt + self.n}
            if conn.cfg.has_timings:
                usage["timings"] = _timings(conn.cfg, self.n, self.t0)
            conn._event(self.pre + _encode({"id": "x", "choices": [], "usage": usage}) + self.post)
        conn._event(self.pre + b"[DONE]" + self.post)
        conn.transport.write(b"0\r\n\r\n")


async def serve(cfg: StandinConfig, host: str = "127.0.0.1", port: int = 0,
                ready: asyncio.Future[int] | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Conn(cfg), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(bound)
    else:
        print(f"port {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--model", default="standin")
    p.add_argument("--crlf", action="store_true")
    p.add_argument("--comments", action="store_true")
    p.add_argument("--split", action="store_true")
    p.add_argument("--timings", action="store_true")
    p.add_argument("--stamp", action="store_true")
    a = p.parse_args(argv)
    cfg = StandinConfig(a.ttft_ms, a.itl_ms, a.model, a.crlf, a.comments, a.split, a.timings, a.stamp)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(cfg, a.host, a.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
