"""One OpenAI-compatible endpoint under test: its address, model, API flavour, and
the request bodies it gets. Also the control calls around a run: list models,
count tokens with the server's `/tokenize`, and a preflight request that finds
which optional fields (ignore_eos, stream_options) the server accepts.

What this module does NOT know: the load model, statistics, or how responses are
parsed (openai_sink does that).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from scalellm.bench.http_client import ConnectionPool, fetch
from scalellm.bench.openai_sink import OpenAISink
from scalellm.bench.records import BenchRequest, RequestRecord

_encode = msgspec.json.encode


@dataclass(frozen=True)
class EndpointConfig:
    url: str  # base URL: http://host:port (a trailing /v1 is accepted and dropped)
    model: str | None = None  # None: the first model the server lists
    label: str = "A"
    api: Literal["completions", "chat"] = "completions"
    is_stream: bool = True
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ignore_eos: bool = True  # asked for; dropped after preflight when the server refuses it
    include_usage: bool = True  # stream_options.include_usage; same
    temperature: float | None = None  # None: the server's default
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout: float = 600.0  # seconds per request

    @property
    def base_url(self) -> str:
        u = self.url.rstrip("/")
        return u[:-3] if u.endswith("/v1") else u

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.api == "chat" else "/v1/completions"


class Endpoint:
    """An EndpointConfig with its connection pool."""

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self.pool = ConnectionPool(config.base_url)
        self.model = config.model or ""
        self.notes: list[str] = []  # what preflight changed, for the report
        hdrs = {"Content-Type": "application/json", "Accept": "text/event-stream" if config.is_stream else
                "application/json", "User-Agent": "scalellm-bench"}
        if config.api_key:
            hdrs["Authorization"] = f"Bearer {config.api_key}"
        hdrs.update(config.headers)
        self.headers = hdrs

    @property
    def label(self) -> str:
        return self.config.label

    # -- request bodies -----------------------------------------------------------------
    def body(self, req: BenchRequest) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {"model": self.model}
        if c.api == "chat":
            body["messages"] = req.messages if req.messages is not None else [{"role": "user", "content": req.prompt}]
        else:
            if req.prompt is None:
                raise ValueError(f"request {req.request_id} has chat messages; use --api chat")
            body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
        body["stream"] = c.is_stream
        if c.is_stream and c.include_usage:
            body["stream_options"] = {"include_usage": True}
        if c.ignore_eos:
            body["ignore_eos"] = True
        if c.temperature is not None:
            body["temperature"] = c.temperature
        body.update(c.extra_body)
        return body

    def encode(self, req: BenchRequest) -> bytes:
        return self.pool.encode("POST", self.config.path, self.headers, _encode(self.body(req)))

    def new_record(self, req: BenchRequest, scheduled: float) -> tuple[RequestRecord, OpenAISink]:
        rec = RequestRecord(request_id=req.request_id, endpoint=self.label, scheduled=scheduled,
                            input_tokens=req.input_len, expected_output_len=req.output_len)
        return rec, OpenAISink(rec)

    # -- control calls ------------------------------------------------------------------
    async def list_models(self) -> list[str]:
        r = await fetch(self.pool, "GET", "/v1/models", self.headers)
        if r.status != 200:
            raise RuntimeError(f"{self.config.base_url}/v1/models answered {r.status}: {bytes(r.body)[:200]!r}")
        data = msgspec.json.decode(bytes(r.body))
        return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and "id" in m]

    async def tokenize(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                       add_special_tokens: bool = True) -> list[int] | None:
        """Token ids from the server's /tokenize, or None when it has none (404/405/501)."""
        body: dict[str, Any] = {"model": self.model, "add_special_tokens": add_special_tokens}
        if messages is not None:
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        r = await fetch(self.pool, "POST", "/tokenize", self.headers, _encode(body))
        if r.status in (404, 405, 501):
            return None
        if r.status != 200:
            raise RuntimeError(f"/tokenize answered {r.status}: {bytes(r.body)[:300]!r}")
        return list(msgspec.json.decode(bytes(r.body))["tokens"])

    async def prepare(self) -> None:
        """Resolve the model name and drop optional fields the server refuses."""
        if not self.model:
            models = await self.list_models()
            if not models:
                raise RuntimeError(f"{self.config.base_url} lists no models; give --model")
            self.model = models[0]
        probe = BenchRequest(-1, "Hello", None, -1, 2)
        for _ in range(3):
            rec, sink = self.new_record(probe, 0.0)
            await self.pool.request(self.encode(probe), sink, 120.0)
            if rec.is_ok:
                return
            message = rec.error_message.lower()
            if rec.status in (400, 422) and self.config.ignore_eos and "ignore_eos" in message:
                self.config = dataclasses.replace(self.config, ignore_eos=False)
                self.notes.append("server refused ignore_eos: output lengths are upper bounds")
                continue
            if rec.status in (400, 422) and self.config.include_usage and "stream_options" in message:
                self.config = dataclasses.replace(self.config, include_usage=False)
                self.notes.append("server refused stream_options: token counts come from the tokenizer")
                continue
            raise RuntimeError(f"preflight request to {self.config.base_url}{self.config.path} failed: "
                               f"{rec.error} {rec.error_message}")

    def close(self) -> None:
        self.pool.close()
