"""One request as the client sees it, for the OpenAI app: its TTFT, ITL, TPOT and e2e
(observed into the app's metrics), token counts, output filtering per choice, and the
latency breakdown built from the timestamps each hop adds (see scalellm.api.app)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from scalellm.api.metrics import APIMetrics
from scalellm.api.safety import ContentFilter, FilterHit, StreamFilter
from scalellm.api.tracing import RequestSpan
from scalellm.protocol.generation import GenerateChunk


# Stamps of a request's life, in path order; a segment is named by the stamp that ends it.
# A hop that is absent (no gateway in front, say) merges into the next segment.
_STAGES = (("routed_unix", "gateway"), ("received_unix", "network"), ("queued_unix", "tokenize"),
           ("first_scheduled_unix", "queue"), ("first_token_unix", "prefill"), ("finished_unix", "decode"))


class RequestTracker:
    """One request as the client sees it: TTFT, ITL, TPOT, e2e and token counts, output
    filtering per choice, and the latency breakdown from the hops' timestamps."""

    def __init__(self, metrics: APIMetrics, arrival: tuple[float, float], num_choices: int,
                 output_filter: ContentFilter, span: RequestSpan | None = None) -> None:
        self.metrics = metrics
        self.span = span
        self.t0, self.arrival_unix = arrival
        self.num_choices = num_choices
        self.streaming = False
        self.first: float | None = None
        self.last = 0.0
        self.counts: dict[int, tuple[int, int]] = {}  # choice base -> (prompt, completion) tokens
        self.timings: dict[str, float] = {}
        self._filter = output_filter if output_filter else None
        self._filters: dict[int, StreamFilter] = {}
        self._filtered: set[int] = set()

    @property
    def prompt_tokens(self) -> int:
        return sum(p for p, _ in self.counts.values())

    @property
    def completion_tokens(self) -> int:
        return sum(c for _, c in self.counts.values())

    async def relay(self, items: AsyncIterator[tuple[int, GenerateChunk]]) -> AsyncIterator[tuple[int, GenerateChunk]]:
        try:
            async for base, chunk in items:
                now = time.monotonic()
                has_tokens = False
                for c in chunk.choices:  # NOTE: a plain loop: any(genexpr) per chunk costs more
                    if c.token_ids:
                        has_tokens = True
                        break
                if has_tokens:
                    if self.first is None:
                        self.first = now
                        self.metrics.ttft.observe(now - self.t0)
                    elif self.streaming:
                        self.metrics.itl.observe(now - self.last)
                    self.last = now
                self.counts[base] = (chunk.num_prompt_tokens, chunk.num_completion_tokens)
                if chunk.finished:
                    self.timings = chunk.timings
                    if "queue" in chunk.timings:
                        self.metrics.queue.observe(chunk.timings["queue"])
                if self._filter is not None and self._apply_filter(base, chunk):
                    yield base, chunk
                    return  # every choice was cut by the filter: closing `items` aborts upstream
                yield base, chunk
        finally:
            await items.aclose()

    def _apply_filter(self, base: int, chunk: GenerateChunk) -> bool:
        """Filter the chunk's text in place; True when no choice is left running."""
        kept = []
        for c in chunk.choices:
            i = base + c.index
            if i in self._filtered:
                continue
            sf = self._filters.get(i)
            if sf is None:
                sf = self._filters[i] = self._filter.stream()  # type: ignore[union-attr]
            try:
                text = sf.feed(c.text)
                if c.finish_reason:
                    text += sf.finish()
            except FilterHit as hit:
                text, c.finish_reason, c.stop_reason = hit.safe_text, "content_filter", None
                self._filtered.add(i)
                self.metrics.error("content_filter_output")
            c.text = text
            kept.append(c)
        chunk.choices = kept
        return len(self._filtered) == self.num_choices

    def finish(self) -> dict[str, float]:
        """Observe the request's metrics; returns its latency breakdown in milliseconds."""
        now = time.monotonic()
        e2e = now - self.t0
        self.metrics.e2e.observe(e2e)
        n = self.completion_tokens
        if self.first is not None and n > 1:
            self.metrics.tpot.observe((self.last - self.first) / (n - 1))
        out: dict[str, float] = {}
        prev = self.arrival_unix
        for key, name in _STAGES:
            t = self.timings.get(key)
            if t:
                out[name] = round(max(t - prev, 0.0) * 1e3, 3)
                prev = t
        end_unix = self.arrival_unix + e2e
        out["return"] = round(max(end_unix - prev, 0.0) * 1e3, 3)
        out["total"] = round(e2e * 1e3, 3)
        if self.first is not None:
            out["ttft"] = round((self.first - self.t0) * 1e3, 3)
        for name, ms in out.items():
            if name not in ("total", "ttft"):
                self.metrics.stage.labels(name).observe(ms / 1e3)
        received, finished = self.timings.get("received_unix"), self.timings.get("finished_unix")
        if received and finished and "routed_unix" in self.timings:  # behind a gateway
            overhead = max(e2e - (finished - received), 0.0)
            out["overhead"] = round(overhead * 1e3, 3)
            self.metrics.overhead.observe(overhead)
        if self.span is not None:
            self.span.usage(self.prompt_tokens, self.completion_tokens)
            self.span.latency(out)
        return out
