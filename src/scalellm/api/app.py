"""A lean ASGI app for the OpenAI API: no framework, msgspec JSON, SSE streaming.

Routes: POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize;
GET /v1/models, /health, /ready, /metrics. The app knows a Backend (replica engine
or gateway), never the engine itself. A client that disconnects mid-stream stops
the backend's iterator, which aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import msgspec

from scalellm.api import responses as R
from scalellm.api.errors import APIError, bad_request, from_exception, model_not_found, unavailable
from scalellm.api.metrics import APIMetrics
from scalellm.protocol.generation import GenerateCall, GenerateChunk
from scalellm.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    decode_request,
)

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
MAX_BODY = 32 << 20


class Backend(Protocol):
    model_names: list[str]

    def is_ready(self) -> bool: ...
    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerateChunk]: ...
    async def tokenize(self, prompt: str | None, messages: list[dict] | None, add_special_tokens: bool) -> list[int]: ...
    async def detokenize(self, tokens: list[int]) -> str: ...
    def engine_gauges(self) -> dict[str, float]: ...


class OpenAIApp:
    def __init__(self, backend: Backend, api_key: str | None = None, metrics: APIMetrics | None = None) -> None:
        self.backend = backend
        self.api_key = api_key
        self.metrics = metrics or APIMetrics(backend.engine_gauges)
        self.draining = False
        self.on_startup: list[Callable[[], Awaitable[None]]] = []
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self._routes: dict[tuple[str, str], Callable[..., Awaitable[None]]] = {
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/tokenize"): self._tokenize,
            ("POST", "/detokenize"): self._detokenize,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/ready"): self._ready,
            ("GET", "/metrics"): self._metrics,
        }

    # -- ASGI -----------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        path = scope["path"]
        handler = self._routes.get((scope["method"], path))
        endpoint = path if handler else "other"
        try:
            if handler is None:
                if any(p == path for _, p in self._routes):
                    raise APIError(405, f"method {scope['method']} not allowed on {path}", "invalid_request_error")
                raise APIError(404, f"no route {path}", "invalid_request_error")
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
                self._check_auth(scope)
            status = await handler(scope, receive, send)
        except Exception as e:  # noqa: BLE001 - every error becomes an OpenAI error body
            err = from_exception(e)
            if err.status == 500:
                logger.exception("error on %s", path)
            await _send_json(send, err.status, err.body(), err.headers)
            status = err.status
        self.metrics.request_done(endpoint, status)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    for fn in self.on_startup:
                        await fn()
                except Exception as e:  # noqa: BLE001
                    logger.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                for fn in self.on_shutdown:
                    try:
                        await fn()
                    except Exception:  # noqa: BLE001
                        logger.exception("shutdown step failed")
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _check_auth(self, scope: Scope) -> None:
        if self.api_key is None:
            return
        for k, v in scope["headers"]:
            if k == b"authorization" and v.decode("latin-1") == f"Bearer {self.api_key}":
                return
        raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", "invalid_request_error",
                       None, "invalid_api_key")

    # -- simple routes ----------------------------------------------------------------
    async def _health(self, scope: Scope, receive: Receive, send: Send) -> int:
        await _send_json(send, 200, b'{"status":"ok"}')
        return 200

    async def _ready(self, scope: Scope, receive: Receive, send: Send) -> int:
        ok = self.backend.is_ready() and not self.draining
        await _send_json(send, 200 if ok else 503, b'{"ready":true}' if ok else b'{"ready":false}')
        return 200 if ok else 503

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> int:
        body, ctype = self.metrics.render()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype.encode())]})
        await send({"type": "http.response.body", "body": body})
        return 200

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> int:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "scalellm"} for m in self.backend.model_names]
        await _send_json(send, 200, msgspec.json.encode({"object": "list", "data": data}))
        return 200

    async def _tokenize(self, scope: Scope, receive: Receive, send: Send) -> int:
        req = decode_request(await _read_body(receive), TokenizeRequest)
        assert isinstance(req, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        msgs = [m.to_dict() for m in req.messages] if req.messages is not None else None
        ids = await self.backend.tokenize(req.prompt, msgs, req.add_special_tokens)
        await _send_json(send, 200, msgspec.json.encode({"tokens": ids, "count": len(ids)}))
        return 200

    async def _detokenize(self, scope: Scope, receive: Receive, send: Send) -> int:
        req = decode_request(await _read_body(receive), DetokenizeRequest)
        assert isinstance(req, DetokenizeRequest)
        text = await self.backend.detokenize(req.tokens)
        await _send_json(send, 200, msgspec.json.encode({"prompt": text}))
        return 200

    def _check_model(self, model: str) -> None:
        if model not in self.backend.model_names:
            raise model_not_found(model, self.backend.model_names)
        if self.draining:
            raise unavailable("server is shutting down")

    # -- generation --------------------------------------------------------------------
    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> int:
        req = decode_request(await _read_body(receive), CompletionRequest)
        assert isinstance(req, CompletionRequest)
        self._check_model(req.model)
        params = req.sampling_params()
        prompts = req.prompts()
        priority, deadline = _controls(scope, req)
        rid = f"cmpl-{uuid.uuid4().hex}"
        calls = [GenerateCall(f"{rid}-{i}" if len(prompts) > 1 else rid, req.model, params, prompt=p,
                              priority=priority, deadline_unix=deadline) for i, p in enumerate(prompts)]
        streams = [await self.backend.generate(c) for c in calls]  # input errors surface here, before any byte
        if req.stream:
            return await self._stream(send, receive, _until(deadline, _merge(streams, params.n)),
                                      lambda chunk, first: self._completion_chunks(rid, req, chunk, first),
                                      rid, req, "text_completion")
        acc = R.Accumulator(len(prompts) * params.n)
        prompt_tokens = completion_tokens = 0
        echo_text: dict[int, str] = {}
        t0 = time.monotonic()
        async for base, chunk in _until(deadline, _merge(streams, params.n)):
            acc.add(chunk, base)
            if chunk.finished:
                prompt_tokens += chunk.num_prompt_tokens
                completion_tokens += chunk.num_completion_tokens
                self.metrics.observe_chunk_timings(chunk)
            if chunk.prompt_text is not None:
                echo_text[base] = chunk.prompt_text
        choices = []
        for i in range(len(acc.text)):
            prefix = echo_text.get(i - i % params.n, "") if req.echo else ""
            lp = R.completion_logprobs(acc.logprobs[i], len(prefix)) if params.logprobs is not None else None
            choices.append(R.completion_choice(i, prefix + acc.text[i], acc.finish[i], lp, acc.stop_reason[i]))
        body = {"id": rid, "object": "text_completion", "created": R.created(), "model": req.model,
                "choices": choices, "usage": R.usage(prompt_tokens, completion_tokens)}
        return await self._send_result(send, body, prompt_tokens, completion_tokens, t0)

    def _completion_chunks(self, rid: str, req: CompletionRequest, item: tuple[int, GenerateChunk], first: set) -> list[dict]:
        base, chunk = item
        out = []
        for c in chunk.choices:
            i = base + c.index
            text = c.text
            if req.echo and i not in first:
                text = (chunk.prompt_text or "") + text
            first.add(i)
            lp = R.completion_logprobs(c.logprobs or [], 0) if req.logprobs is not None else None
            if not text and not c.finish_reason and not (lp and lp["tokens"]):
                continue
            out.append({"id": rid, "object": "text_completion", "created": R.created(), "model": req.model,
                        "choices": [R.completion_choice(i, text, c.finish_reason, lp, c.stop_reason)]})
        return out

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> int:
        req = decode_request(await _read_body(receive), ChatCompletionRequest)
        assert isinstance(req, ChatCompletionRequest)
        self._check_model(req.model)
        params = req.sampling_params()
        priority, deadline = _controls(scope, req)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        call = GenerateCall(rid, req.model, params, messages=[m.to_dict() for m in req.messages],
                            add_generation_prompt=req.add_generation_prompt, priority=priority,
                            deadline_unix=deadline)
        stream = await self.backend.generate(call)
        if req.stream:
            return await self._stream(send, receive, _until(deadline, _merge([stream], params.n)),
                                      lambda item, first: self._chat_chunks(rid, req, item, first),
                                      rid, req, "chat.completion.chunk")
        acc = R.Accumulator(params.n)
        t0 = time.monotonic()
        last = None
        async for base, chunk in _until(deadline, _merge([stream], params.n)):
            acc.add(chunk, base)
            last = chunk
        assert last is not None
        self.metrics.observe_chunk_timings(last)
        choices = [{"index": i, "message": {"role": "assistant", "content": acc.text[i]},
                    "logprobs": R.chat_logprobs(acc.logprobs[i]) if req.logprobs else None,
                    "finish_reason": acc.finish[i], "stop_reason": acc.stop_reason[i]} for i in range(params.n)]
        body = {"id": rid, "object": "chat.completion", "created": R.created(), "model": req.model,
                "choices": choices, "usage": R.usage(last.num_prompt_tokens, last.num_completion_tokens)}
        return await self._send_result(send, body, last.num_prompt_tokens, last.num_completion_tokens, t0)

    async def _send_result(self, send: Send, body: dict, prompt_tokens: int, completion_tokens: int,
                           t0: float) -> int:
        self.metrics.tokens(prompt_tokens, completion_tokens)
        timing = {"server-timing": f"total;dur={(time.monotonic() - t0) * 1e3:.1f}"}
        await _send_json(send, 200, msgspec.json.encode(body), timing)
        return 200

    def _chat_chunks(self, rid: str, req: ChatCompletionRequest, item: tuple[int, GenerateChunk], first: set) -> list[dict]:
        _, chunk = item
        out = []
        for c in chunk.choices:
            is_first = c.index not in first
            first.add(c.index)
            if not c.text and not c.finish_reason and not is_first:
                continue
            lp = R.chat_logprobs(c.logprobs or []) if req.logprobs else None
            out.append({"id": rid, "object": "chat.completion.chunk", "created": R.created(), "model": req.model,
                        "choices": [R.chat_delta_choice(c, c.index, is_first, lp)]})
        return out

    async def _stream(self, send: Send, receive: Receive, items: AsyncIterator[tuple[int, GenerateChunk]],
                      render: Callable, rid: str, req: Any, obj: str) -> int:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-request-id", rid.encode())]})
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        totals: dict[int, tuple[int, int]] = {}
        first: set = set()

        async def pump() -> None:
            try:
                async for item in items:
                    base, chunk = item
                    if chunk.finished:
                        totals[base] = (chunk.num_prompt_tokens, chunk.num_completion_tokens)
                        self.metrics.observe_chunk_timings(chunk)
                    for body in render(item, first):
                        if include_usage:
                            body["usage"] = None
                        await _sse(send, body)
            except Exception as e:  # noqa: BLE001 - mid-stream failure: an error event, then [DONE]
                err = from_exception(e)
                await _sse(send, {"error": {"message": err.message, "type": err.type, "param": err.param,
                                            "code": err.code}})
                return
            if include_usage:
                p = sum(v[0] for v in totals.values())
                c = sum(v[1] for v in totals.values())
                self.metrics.tokens(p, c)
                await _sse(send, {"id": rid, "object": obj, "created": R.created(), "model": req.model,
                                  "choices": [], "usage": R.usage(p, c)})

        # NOTE: one watcher task per request (not a task per chunk) races the stream
        # against the client's disconnect; a disconnect cancels the pump, whose
        # generators' finally blocks abort the request upstream.
        pump_task = asyncio.ensure_future(pump())
        disconnected = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({pump_task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if not pump_task.done():
                pump_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump_task
                return 499
            pump_task.result()
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            return 200
        finally:
            disconnected.cancel()
            await items.aclose()


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


def _controls(scope: Scope, req: Any) -> tuple[int, float]:
    """(priority, deadline_unix) from the body, overridden by x-priority / x-deadline-ms headers."""
    priority = req.priority
    deadline_ms = req.deadline_ms
    h = _header(scope, b"x-priority")
    if h is not None:
        try:
            priority = int(h)
        except ValueError:
            raise bad_request(f"x-priority header must be an integer, got {h!r}", "x-priority") from None
    h = _header(scope, b"x-deadline-ms")
    if h is not None:
        try:
            deadline_ms = int(h)
        except ValueError:
            raise bad_request(f"x-deadline-ms header must be an integer, got {h!r}", "x-deadline-ms") from None
    if deadline_ms is not None and deadline_ms <= 0:
        raise bad_request(f"deadline_ms must be > 0, got {deadline_ms}", "deadline_ms")
    return priority, (time.time() + deadline_ms / 1000 if deadline_ms else 0.0)


async def _until(deadline_unix: float, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Relay items; past the deadline raise TimeoutError (closing `items` aborts upstream)."""
    try:
        if not deadline_unix:
            async for item in items:
                yield item
            return
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(loop.time() + max(deadline_unix - time.time(), 0.0)):
            async for item in items:
                yield item
    finally:
        await items.aclose()


async def _merge(streams: list[AsyncIterator[GenerateChunk]], n: int) -> AsyncIterator[tuple[int, GenerateChunk]]:
    """Interleave several prompts' streams; yields (choice index base, chunk)."""
    if len(streams) == 1:
        try:
            async for chunk in streams[0]:
                yield 0, chunk
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[GenerateChunk]) -> None:
        try:
            async for chunk in s:
                await queue.put((i * n, chunk))
        except Exception as e:  # noqa: BLE001
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise APIError(499, "client disconnected", "invalid_request_error")
        body = msg.get("body", b"")
        size += len(body)
        if size > MAX_BODY:
            raise APIError(413, f"request body over {MAX_BODY} bytes", "invalid_request_error")
        chunks.append(body)
        if not msg.get("more_body"):
            return b"".join(chunks)


async def _send_json(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    hdrs = [(b"content-type", b"application/json")]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def _sse(send: Send, obj: dict) -> None:
    await send({"type": "http.response.body", "body": b"data: " + msgspec.json.encode(obj) + b"\n\n", "more_body": True})
