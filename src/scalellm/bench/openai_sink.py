"""Reads one OpenAI completions / chat completions response into a RequestRecord as
its bytes arrive: SSE events (streaming) or one JSON body, usage, errors, timings.

Per chunk, on the socket-read path: SSE framing, one typed msgspec decode that reads
only the fields we use, one list append. A chunk counts as an output chunk when it
carries text (`choices[].text`, `delta.content`, or reasoning text); its arrival time
is the socket read it came in. Usage (`usage.prompt_tokens`, `completion_tokens`,
optional `timings`) is taken from the last chunk that has it.

What this module does NOT know: sockets, the load model, statistics, tokenizers.
"""

from __future__ import annotations

from typing import Any

import msgspec

from scalellm.bench.records import RequestRecord
from scalellm.bench.sse import SSEParser
from scalellm.bench.timings import from_usage, parse_server_timing


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None  # completions
    delta: _Delta | None = None  # chat, streaming
    message: _Delta | None = None  # chat, whole response


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    timings: Any = None


class _Body(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_body = msgspec.json.Decoder(_Body).decode
_decode_any = msgspec.json.Decoder().decode
_TYPED_ERRORS = (msgspec.ValidationError,)


def _choice_text(c: _Choice) -> str:
    if c.text is not None:
        return c.text
    d = c.delta if c.delta is not None else c.message
    if d is None:
        return ""
    return d.content or d.reasoning_content or d.reasoning or ""


def _loose_body(payload: bytes) -> _Body:
    """Decode without a schema for bodies the typed decoder refuses (odd field types)."""
    obj = _decode_any(payload)
    if not isinstance(obj, dict):
        raise msgspec.DecodeError("not a JSON object")
    choices = []
    for c in obj.get("choices") or []:
        if not isinstance(c, dict):
            continue
        d = c.get("delta") or c.get("message") or {}
        content = d.get("content") if isinstance(d, dict) else None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = c.get("text")
        choices.append(_Choice(text=text if isinstance(text, str) else None,
                               delta=_Delta(content=content if isinstance(content, str) else None)))
    u = obj.get("usage")
    usage = None
    if isinstance(u, dict):
        p, o = u.get("prompt_tokens"), u.get("completion_tokens")
        usage = _Usage(p if isinstance(p, int) else None, o if isinstance(o, int) else None, u.get("timings"))
    return _Body(choices=choices, usage=usage, error=obj.get("error"))


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


class OpenAISink:
    """A ResponseSink (http_client) that fills one RequestRecord."""

    __slots__ = ("record", "_parser", "_is_sse", "_pieces", "_body", "_usage")

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self._parser: SSEParser | None = None
        self._is_sse = False
        self._pieces: list[str] = []
        self._body = bytearray()
        self._usage: _Usage | None = None

    # -- ResponseSink ------------------------------------------------------------------
    def on_headers(self, status: int, headers: list[tuple[bytes, bytes]], t: float) -> None:
        rec = self.record
        rec.status, rec.headers_at = status, t
        for name, value in headers:
            if name == b"server-timing":
                rec.server_timings.update(parse_server_timing(value.decode("latin-1")))
            elif name == b"content-type":
                self._is_sse = status == 200 and b"text/event-stream" in value
        if self._is_sse:
            self._parser = SSEParser()

    def on_body(self, data: bytes, t: float) -> None:
        if self._parser is not None:
            for name, payload in self._parser.feed(data):
                self._event(name, payload, t)
        else:
            self._body += data

    def on_complete(self, t: float) -> None:
        rec = self.record
        rec.end = t
        if self._parser is not None:
            for name, payload in self._parser.close():
                self._event(name, payload, t)
        elif rec.status == 200:
            self._whole_body(bytes(self._body))
        else:
            self._http_error(bytes(self._body))
        if self._usage is not None:
            u = self._usage
            if u.prompt_tokens is not None:
                rec.input_tokens = u.prompt_tokens
            if u.completion_tokens is not None:
                rec.output_tokens, rec.output_token_source = u.completion_tokens, "usage"
            rec.server_timings.update(from_usage(u.timings))
        rec.text = "".join(self._pieces)
        if rec.error is None and rec.status == 200 and self._is_sse and not self._pieces and not rec.output_tokens:
            rec.error, rec.error_message = "empty_stream", "the stream ended without output text or usage"
        rec.is_ok = rec.error is None and rec.status == 200

    # -- internals ---------------------------------------------------------------------
    def _decode(self, payload: bytes) -> _Body | None:
        try:
            return _decode_body(payload)
        except _TYPED_ERRORS:
            pass
        except msgspec.DecodeError as e:
            self._fail("bad_json", f"{e}: {payload[:200]!r}")
            return None
        try:
            return _loose_body(payload)
        except msgspec.DecodeError as e:
            self._fail("bad_json", f"{e}: {payload[:200]!r}")
            return None

    def _event(self, name: bytes, payload: bytes, t: float) -> None:
        if payload == b"[DONE]":
            return
        body = self._decode(payload)
        if body is None:
            return
        if body.error is not None or name == b"error":
            self._fail("stream_error", _error_message(body.error if body.error is not None else payload))
            return
        if body.choices:
            is_output = False
            for c in body.choices:
                text = _choice_text(c)
                if text:
                    self._pieces.append(text)
                    is_output = True
            if is_output:
                rec = self.record
                rec.chunk_times.append(t)
                if rec.first_token_at is None:
                    rec.first_token_at = t
        if body.usage is not None:
            self._usage = body.usage

    def _whole_body(self, payload: bytes) -> None:
        body = self._decode(payload)
        if body is None:
            return
        if body.error is not None:
            self._fail("response_error", _error_message(body.error))
            return
        for c in body.choices or []:
            text = _choice_text(c)
            if text:
                self._pieces.append(text)
        if body.usage is not None:
            self._usage = body.usage

    def _http_error(self, payload: bytes) -> None:
        message = payload[:500].decode("utf-8", "replace")
        try:
            obj = _decode_any(payload)
            if isinstance(obj, dict) and "error" in obj:
                message = _error_message(obj["error"])
            elif isinstance(obj, dict) and "detail" in obj:
                message = str(obj["detail"])
        except msgspec.DecodeError:
            pass
        self._fail(f"http_{self.record.status}", message)

    def _fail(self, kind: str, message: str) -> None:
        if self.record.error is None:
            self.record.error, self.record.error_message = kind, message[:500]
