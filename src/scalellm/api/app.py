"""A lean ASGI app for the OpenAI API: no framework, msgspec JSON, SSE streaming.

Routes: POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize;
GET /v1/models, /health, /ready, /metrics (+ routes a server adds, e.g. the gateway's
admin API). The app knows a Backend (replica engine or gateway), never the engine
itself. A client that disconnects, streamed or not, stops the backend's iterator,
which aborts the request.

Every generation request passes the Guard (keys, rate limits, request limits, input
filters, concurrency/admission; output filters on the way back) and is tracked: its
own TTFT/ITL/TPOT/e2e as the client sees them, and a latency breakdown built from the
timestamps each hop adds (gateway routed, replica received/queued/first scheduled/
first token/finished), returned in a Server-Timing header (non-streamed) and in the
usage block (`usage.timings`, milliseconds) and exported as metrics. With tracing on
(scalellm.api.tracing), each routed request also gets a span carrying the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import msgspec

from scalellm.api import responses as R
from scalellm.api.errors import APIError, bad_request, from_exception, model_not_found, unavailable
from scalellm.api.guard import Guard
from scalellm.api.metrics import APIMetrics
from scalellm.api.streams import merge, until
from scalellm.api.tracing import RequestSpan, Tracing
from scalellm.api.tracker import RequestTracker
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
Handler = Callable[[Scope, Receive, Send], Awaitable[int]]
_TRACE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_UNTRACED = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes: no spans


class Backend(Protocol):
    model_names: list[str]

    def is_ready(self) -> bool: ...
    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerateChunk]: ...
    async def tokenize(self, prompt: str | None, messages: list[dict] | None, add_special_tokens: bool) -> list[int]: ...
    async def detokenize(self, tokens: list[int]) -> str: ...
    def engine_gauges(self) -> dict[str, float]: ...


class OpenAIApp:
    def __init__(self, backend: Backend, api_key: str | None = None, metrics: APIMetrics | None = None,
                 guard: Guard | None = None, tracing: Tracing | None = None) -> None:
        self.backend = backend
        self.tracing = tracing
        self.guard = guard or Guard.with_key(api_key)
        self.metrics = metrics or APIMetrics(lambda: {**backend.engine_gauges(), **self.guard.gauges()})
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

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """A server's own route (it does its own auth); returns the HTTP status it sent."""
        self._routes[(method, path)] = handler

    # -- ASGI -----------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        path = scope["path"]
        handler = self._routes.get((scope["method"], path))
        endpoint = path if handler else "other"
        trace = _header(scope, b"x-request-id")
        if trace is None or not _TRACE_ID.fullmatch(trace):
            trace = uuid.uuid4().hex
        scope["scalellm.trace"] = trace
        scope["scalellm.arrival"] = (time.monotonic(), time.time())
        span = None
        if self.tracing is not None and handler is not None and path not in _UNTRACED:
            span = scope["scalellm.span"] = self._start_span(scope, path, trace)
        status = 499  # unless set below: the request was cancelled (the client went away)
        try:
            if handler is None:
                if any(p == path for _, p in self._routes):
                    raise APIError(405, f"method {scope['method']} not allowed on {path}", "invalid_request_error")
                raise APIError(404, f"no route {path}", "invalid_request_error")
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
                scope["scalellm.key"] = self.guard.authenticate(_header(scope, b"authorization"), trace)
            status = await handler(scope, receive, send)
        except Exception as e:  # noqa: BLE001 - every error becomes an OpenAI error body
            err = from_exception(e)
            if err.status == 500:
                logger.exception("error on %s (request_id=%s)", path, trace, extra={"request_id": trace})
            elif err.status >= 400:
                logger.info("request_id=%s %s -> %d %s", trace, path, err.status, err.code or err.type,
                            extra={"request_id": trace, "status": err.status})
            await _send_json(send, err.status, err.body(), {**err.headers, "x-request-id": trace})
            status = err.status
            self.metrics.error(err.code or err.type)
            if span is not None and status >= 500:  # a client's error is not the server's (OTel HTTP rules)
                span.fail(f"{status} {err.code or err.type}")
        finally:
            if span is not None:
                span.set("http.response.status_code", status)
                span.end()
        self.metrics.request_done(endpoint, status)

    def _start_span(self, scope: Scope, path: str, trace: str) -> RequestSpan:
        assert self.tracing is not None
        return self.tracing.start(f"{scope['method']} {path}", scope["scalellm.arrival"][1],
                                  _header(scope, b"traceparent"),
                                  {"http.request.method": scope["method"], "url.path": path,
                                   "scalellm.request_id": trace})

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
        req = decode_request(await self._body(scope, receive), TokenizeRequest)
        assert isinstance(req, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        msgs = [m.to_dict() for m in req.messages] if req.messages is not None else None
        ids = await self.backend.tokenize(req.prompt, msgs, req.add_special_tokens)
        await _send_json(send, 200, msgspec.json.encode({"tokens": ids, "count": len(ids)}))
        return 200

    async def _detokenize(self, scope: Scope, receive: Receive, send: Send) -> int:
        req = decode_request(await self._body(scope, receive), DetokenizeRequest)
        assert isinstance(req, DetokenizeRequest)
        text = await self.backend.detokenize(req.tokens)
        await _send_json(send, 200, msgspec.json.encode({"prompt": text}))
        return 200

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        return await read_body(scope, receive, self.guard.safety.limits.max_body_bytes)

    def _check_model(self, model: str) -> None:
        if model not in self.backend.model_names:
            raise model_not_found(model, self.backend.model_names)
        if self.draining:
            raise unavailable("server is shutting down")

    # -- generation --------------------------------------------------------------------
    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> int:
        req = decode_request(await self._body(scope, receive), CompletionRequest)
        assert isinstance(req, CompletionRequest)
        self._check_model(req.model)
        params = req.sampling_params()
        key, trace = scope["scalellm.key"], scope["scalellm.trace"]
        prompts, _ = self.guard.check_request(key, trace, req.prompts(), None, params.max_tokens, params.n,
                                              params.logprobs is not None)
        assert prompts is not None
        priority, deadline = _controls(scope, req)
        rid = f"cmpl-{uuid.uuid4().hex}"
        span = _describe_span(scope, req.model, rid) if self.tracing is not None else None
        track = RequestTracker(self.metrics, scope["scalellm.arrival"], len(prompts) * params.n, self.guard.output_filter,
                         span)
        traceparent = span.traceparent if span is not None else ""
        async with self.guard.admit(key, trace, priority):
            calls = [GenerateCall(f"{rid}-{i}" if len(prompts) > 1 else rid, req.model, params, prompt=p,
                                  priority=priority, deadline_unix=deadline, trace_id=trace,
                                  arrival_unix=track.arrival_unix, traceparent=traceparent)
                     for i, p in enumerate(prompts)]
            streams = [await self.backend.generate(c) for c in calls]  # input errors surface here, before any byte
            items = track.relay(until(deadline, merge(streams, params.n)))
            if req.stream:
                status = await self._stream(send, receive, items,
                                            lambda chunk, first: self._completion_chunks(rid, req, chunk, first),
                                            rid, req, "text_completion", track, trace)
            else:
                acc = R.Accumulator(len(prompts) * params.n)
                echo_text: dict[int, str] = {}

                def add(chunk: GenerateChunk, base: int) -> None:
                    acc.add(chunk, base)
                    if chunk.prompt_text is not None:
                        echo_text[base] = chunk.prompt_text

                if not await _collect(receive, items, add):
                    status = 499
                else:
                    choices = []
                    for i in range(len(acc.text)):
                        prefix = echo_text.get(i - i % params.n, "") if req.echo else ""
                        lp = (R.completion_logprobs(acc.logprobs[i], len(prefix)) if params.logprobs is not None
                              else None)
                        choices.append(R.completion_choice(i, prefix + acc.text[i], acc.finish[i], lp,
                                                           acc.stop_reason[i]))
                    body = {"id": rid, "object": "text_completion", "created": R.created(), "model": req.model,
                            "choices": choices, "usage": None}
                    status = await self._send_result(send, body, track, trace)
        self._finish(key, track)
        return status

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
        req = decode_request(await self._body(scope, receive), ChatCompletionRequest)
        assert isinstance(req, ChatCompletionRequest)
        self._check_model(req.model)
        params = req.sampling_params()
        key, trace = scope["scalellm.key"], scope["scalellm.trace"]
        _, messages = self.guard.check_request(key, trace, None, [m.to_dict() for m in req.messages],
                                               params.max_tokens, params.n, params.logprobs is not None)
        priority, deadline = _controls(scope, req)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        span = _describe_span(scope, req.model, rid) if self.tracing is not None else None
        track = RequestTracker(self.metrics, scope["scalellm.arrival"], params.n, self.guard.output_filter, span)
        async with self.guard.admit(key, trace, priority):
            call = GenerateCall(rid, req.model, params, messages=messages,
                                add_generation_prompt=req.add_generation_prompt, priority=priority,
                                deadline_unix=deadline, trace_id=trace, arrival_unix=track.arrival_unix,
                                traceparent=span.traceparent if span is not None else "")
            stream = await self.backend.generate(call)
            items = track.relay(until(deadline, merge([stream], params.n)))
            if req.stream:
                status = await self._stream(send, receive, items,
                                            lambda item, first: self._chat_chunks(rid, req, item, first),
                                            rid, req, "chat.completion.chunk", track, trace)
            else:
                acc = R.Accumulator(params.n)
                if not await _collect(receive, items, acc.add):
                    status = 499
                else:
                    choices = [{"index": i, "message": {"role": "assistant", "content": acc.text[i]},
                                "logprobs": R.chat_logprobs(acc.logprobs[i]) if req.logprobs else None,
                                "finish_reason": acc.finish[i], "stop_reason": acc.stop_reason[i]}
                               for i in range(params.n)]
                    body = {"id": rid, "object": "chat.completion", "created": R.created(), "model": req.model,
                            "choices": choices, "usage": None}
                    status = await self._send_result(send, body, track, trace)
        self._finish(key, track)
        return status

    async def _send_result(self, send: Send, body: dict, track: RequestTracker, trace: str) -> int:
        breakdown = track.finish()
        body["usage"] = {**R.usage(track.prompt_tokens, track.completion_tokens), "timings": breakdown}
        headers = {"server-timing": _server_timing(breakdown), "x-request-id": trace}
        await _send_json(send, 200, msgspec.json.encode(body), headers)
        return 200

    def _finish(self, key: Any, track: RequestTracker) -> None:
        self.metrics.tokens(track.prompt_tokens, track.completion_tokens)
        self.guard.charge(key, track.prompt_tokens + track.completion_tokens)

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
                      render: Callable, rid: str, req: Any, obj: str, track: RequestTracker, trace: str) -> int:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            (b"x-request-id", trace.encode())]})
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and opts.continuous_usage_stats
        first: set = set()
        track.streaming = True
        # NOTE: with one choice, the finished chunk is the last before the usage chunk and
        # [DONE] (the backend's stream ends right after it): the three go out in one write.
        hold_last = track.num_choices == 1
        tail: list[bytes] = []

        async def pump() -> None:
            try:
                async for item in items:
                    for body in render(item, first):
                        if continuous:
                            body["usage"] = R.usage(track.prompt_tokens, track.completion_tokens)
                        elif include_usage:
                            body["usage"] = None
                        data = b"data: " + msgspec.json.encode(body) + b"\n\n"
                        if hold_last and item[1].finished:
                            tail.append(data)
                        else:
                            await send({"type": "http.response.body", "body": data, "more_body": True})
            except Exception as e:  # noqa: BLE001 - mid-stream failure: an error event, then [DONE]
                err = from_exception(e)
                self.metrics.error(err.code or err.type)
                logger.info("request_id=%s failed mid-stream: %s", trace, err.message, extra={"request_id": trace})
                if track.span is not None:
                    track.span.fail(f"mid-stream {err.status} {err.code or err.type}")
                tail.append(b"data: " + msgspec.json.encode({"error": {
                    "message": err.message, "type": err.type, "param": err.param, "code": err.code}}) + b"\n\n")
                return
            breakdown = track.finish()
            if include_usage:
                tail.append(b"data: " + msgspec.json.encode({
                    "id": rid, "object": obj, "created": R.created(), "model": req.model, "choices": [],
                    "usage": {**R.usage(track.prompt_tokens, track.completion_tokens), "timings": breakdown}})
                    + b"\n\n")

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
            await send({"type": "http.response.body", "body": b"".join(tail) + b"data: [DONE]\n\n",
                        "more_body": False})
            return 200
        finally:
            disconnected.cancel()
            await items.aclose()


def _describe_span(scope: Scope, model: str, rid: str) -> RequestSpan | None:
    span = scope.get("scalellm.span")
    if span is not None:
        span.set("gen_ai.request.model", model)
        span.set("scalellm.completion_id", rid)
    return span


def _server_timing(breakdown: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={ms:g}" for name, ms in breakdown.items())


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


async def _collect(receive: Receive, items: AsyncIterator[tuple[int, GenerateChunk]],
                   add: Callable[[GenerateChunk, int], None]) -> bool:
    """Feed a non-streamed response's chunks to `add` while watching for the client's
    disconnect. False when the client went away first: the backend's stream is closed,
    which aborts the request upstream."""
    # NOTE: one watcher task that cancels this one on disconnect (~10 us per request),
    # rather than a task per side and asyncio.wait as in _stream.
    task = asyncio.current_task()
    gone = done = False

    def on_disconnect(watcher: asyncio.Future) -> None:
        nonlocal gone
        if not watcher.cancelled() and not done and task is not None:
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    watcher.add_done_callback(on_disconnect)
    try:
        async for base, chunk in items:
            add(chunk, base)
        return True
    except asyncio.CancelledError:
        if not gone or task is None:
            raise
        task.uncancel()
        return False
    finally:
        done = True
        watcher.cancel()
        await items.aclose()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def read_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes:
    length = _header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"request body over this server's limit of {max_bytes} bytes", "invalid_request_error",
                       None, "body_too_large")
    chunks = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise APIError(499, "client disconnected", "invalid_request_error")
        body = msg.get("body", b"")
        size += len(body)
        if size > max_bytes:
            raise APIError(413, f"request body over this server's limit of {max_bytes} bytes",
                           "invalid_request_error", None, "body_too_large")
        chunks.append(body)
        if not msg.get("more_body"):
            return b"".join(chunks)


async def _send_json(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    hdrs = [(b"content-type", b"application/json")]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})

