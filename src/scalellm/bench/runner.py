"""The load models and the run loop.

- closed loop (`concurrency=C`): C workers, each sends its next request when its
  previous one completes. A request's `scheduled` time is when its worker became
  free, so `sent - scheduled` is the client's own turnaround delay.
- open loop (`request_rate=R`): arrivals at exponential gaps (Poisson), or gamma
  gaps with shape `burstiness` (< 1 burstier, > 1 more regular; mean gap 1/R
  either way); R = inf sends everything at once. `max_concurrency` caps requests in
  flight; a capped request is scheduled when it gets its slot, so the send lag stays
  a measure of the client alone.
- sweeps run one load point after another; with two endpoints (compare) each point
  is split into rounds in A B B A order so slow drift of a noisy machine falls on
  both equally.

Also measured per run: the event loop's ready-queue delay (a probe callback every
10 ms, the time from call_soon to running: how long a socket read can wait before it
is stamped) and the process CPU share.

What this module does NOT know: the wire format (endpoint, openai_sink), statistics,
tables or plots.
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from scalellm.bench.endpoint import Endpoint
from scalellm.bench.http_client import HTTPError
from scalellm.bench.records import BenchRequest, RequestRecord
from scalellm.bench.stats import SLO, distribution, ratios, summarize, window_s
from scalellm.bench.tokens import LocalCounter, ServerCounter, fill_output_tokens


@dataclass(frozen=True)
class LoadPoint:
    concurrency: int | None = None  # closed loop
    request_rate: float | None = None  # open loop, requests/s (math.inf: all at once)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_requests: int | None = None  # measured requests; None: until `duration`
    duration: float | None = None  # seconds; stops sending new requests after it

    @property
    def kind(self) -> str:
        return "concurrency" if self.concurrency is not None else "request_rate"

    @property
    def value(self) -> float:
        return float(self.concurrency if self.concurrency is not None else self.request_rate)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"c={self.concurrency}"
        return "rate=inf" if math.isinf(self.value) else f"rate={self.value:g}/s"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "label": self.label, "burstiness": self.burstiness,
                "max_concurrency": self.max_concurrency, "num_requests": self.num_requests,
                "duration_s": self.duration}


class Progress(Protocol):
    def begin(self, label: str, total: int | None, duration: float | None) -> None: ...
    def update(self, done: int, errors: int, output_tokens: int) -> None: ...
    def end(self) -> None: ...


class _NoProgress:
    def begin(self, label: str, total: int | None, duration: float | None) -> None: ...
    def update(self, done: int, errors: int, output_tokens: int) -> None: ...
    def end(self) -> None: ...


@dataclass
class PointResult:
    """One endpoint at one load point: its records (all rounds) and their summary."""

    point: LoadPoint
    endpoint: str
    records: list[RequestRecord] = field(default_factory=list)
    loop_lag_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    window_s: float = 0.0  # rounds' windows (first send to last end) added up
    summary: dict[str, Any] = field(default_factory=dict)


SinkFactory = Callable[[Endpoint, BenchRequest, float], tuple[RequestRecord, Any]]


class _LoopLagProbe:
    """Ready-queue delay of the event loop, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.samples_ms: list[float] = []
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self._loop.call_soon(self._measure, time.perf_counter())
        self._handle = self._loop.call_later(self.interval, self._tick)

    def _measure(self, t: float) -> None:
        self.samples_ms.append((time.perf_counter() - t) * 1e3)

    def stop(self) -> list[float]:
        if self._handle is not None:
            self._handle.cancel()
        return self.samples_ms


class Runner:
    """Sends one workload to one or more endpoints over a list of load points."""

    def __init__(self, endpoints: list[Endpoint], requests: list[BenchRequest], *, num_warmup: int = 0,
                 rounds: int = 1, seed: int = 0, slo: SLO | None = None, progress: Progress | None = None,
                 counter: ServerCounter | LocalCounter | None = None, sink_factory: SinkFactory | None = None,
                 settle_s: float = 0.0) -> None:
        if len(requests) <= num_warmup:
            raise ValueError("the workload has no requests left after the warm-up ones")
        self.endpoints = endpoints
        self.warmup_requests = requests[:num_warmup]
        self.requests = requests[num_warmup:]
        self.rounds = max(1, rounds) if len(endpoints) > 1 else 1
        self.seed = seed
        # NOTE: a pause before each measured run, so no server still works on what came before:
        # vLLM's CPU server keeps a core busy for 1-1.5 s after its last request ends, and in an
        # A/B run that landed on A's first burst (its first prefill step ~1 s late)
        self.settle_s = settle_s
        self.slo = slo
        self.progress = progress or _NoProgress()
        self.counter = counter
        self.sink_factory = sink_factory or (lambda ep, req, t: ep.new_record(req, t))
        # request bytes, encoded once per endpoint before any timing starts
        self._payloads = {ep.label: [ep.encode(r) for r in requests] for ep in endpoints}
        self._num_warmup = num_warmup

    # -- public -------------------------------------------------------------------------
    async def run(self, points: list[LoadPoint]) -> list[PointResult]:
        results: list[PointResult] = []
        for point in points:
            by_label = {ep.label: PointResult(point, ep.label) for ep in self.endpoints}
            if self.warmup_requests:
                for ep in self.endpoints:
                    warm = LoadPoint(point.concurrency, point.request_rate, point.burstiness, point.max_concurrency,
                                     num_requests=len(self.warmup_requests))
                    await self._run_round(ep, warm, list(range(len(self.warmup_requests))), f"{point.label} warm-up",
                                          None, round_index=-1)
            for r, ep_order in enumerate(self._round_orders()):
                ids = self._round_ids(point, r)
                for ep in ep_order:
                    if self.settle_s > 0:
                        await asyncio.sleep(self.settle_s)
                    await self._run_round(ep, point, ids, f"{ep.label} {point.label}"
                                          + (f" round {r + 1}/{self.rounds}" if self.rounds > 1 else ""),
                                          by_label[ep.label], round_index=r)
            for res in by_label.values():
                await fill_output_tokens(res.records, self.counter)
                res.summary = summarize(res.records, self.slo, res.window_s)
                res.summary["client"]["loop_lag_ms"] = distribution(res.loop_lag_ms)
                res.summary["client"]["cpu_percent"] = 100.0 * res.cpu_s / res.wall_s if res.wall_s else 0.0
                results.append(res)
        return results

    @staticmethod
    def compare(results: list[PointResult], label_a: str, label_b: str) -> list[dict[str, Any]]:
        """B / A ratios at each load point."""
        out = []
        by_point: dict[LoadPoint, dict[str, PointResult]] = {}
        for res in results:
            by_point.setdefault(res.point, {})[res.endpoint] = res
        for point, pair in by_point.items():
            if label_a in pair and label_b in pair:
                out.append({"point": point.as_dict(), "a": label_a, "b": label_b,
                            "b_over_a": ratios(pair[label_a].summary, pair[label_b].summary)})
        return out

    # -- rounds ----------------------------------------------------------------------------
    def _round_orders(self) -> list[list[Endpoint]]:
        if len(self.endpoints) == 1:
            return [self.endpoints]
        return [self.endpoints if r % 2 == 0 else self.endpoints[::-1] for r in range(self.rounds)]

    def _round_ids(self, point: LoadPoint, r: int) -> list[int]:
        """Indices (into the measured requests, cycled) of round r."""
        n = point.num_requests
        if n is None:  # duration-bound: every round may use the whole pool
            return list(range(len(self.requests)))
        lo, hi = n * r // self.rounds, n * (r + 1) // self.rounds
        return [i % len(self.requests) for i in range(lo, hi)]

    async def _run_round(self, ep: Endpoint, point: LoadPoint, ids: list[int], label: str,
                         into: PointResult | None, round_index: int) -> None:
        is_warmup = round_index < 0
        reqs = self.warmup_requests if is_warmup else self.requests
        offset = 0 if is_warmup else self._num_warmup
        payloads = self._payloads[ep.label]
        duration = None if point.num_requests is not None else (point.duration or 0) / self.rounds
        records: list[RequestRecord] = []
        counters = [0, 0, 0]  # done, errors, output chunks

        async def one(j: int, scheduled: float) -> RequestRecord:
            i = ids[j % len(ids)]
            rec, sink = self.sink_factory(ep, reqs[i], scheduled)
            try:
                rec.sent = await ep.pool.request(payloads[offset + i], sink, ep.config.timeout)
            except HTTPError as e:
                rec.end = time.perf_counter()
                rec.sent = e.sent_at or rec.end
                rec.error, rec.error_message, rec.is_ok = e.kind, str(e), False
            records.append(rec)
            counters[0] += 1
            counters[1] += not rec.is_ok
            counters[2] += rec.output_tokens or len(rec.chunk_times)
            return rec

        self.progress.begin(label, None if duration is not None else len(ids), duration)
        probe = _LoopLagProbe()
        probe.start()
        ticker = asyncio.ensure_future(self._tick_progress(counters))
        # NOTE: no cyclic GC while a round runs: a full collection over thousands of records
        # stalls the loop for milliseconds, which would show up as server latency. One
        # collection before and the normal collector after keep memory bounded.
        gc.collect()
        gc.disable()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            if point.concurrency is not None:
                await self._closed_loop(one, point.concurrency, None if duration is not None else len(ids), duration)
            else:
                await self._open_loop(one, point, len(ids) if duration is None else None, duration,
                                      random.Random(f"{self.seed}/arrivals/{point.label}/{round_index}"))
        finally:
            gc.enable()
            ticker.cancel()
            lags = probe.stop()
            self.progress.update(*counters)
            self.progress.end()
        if into is not None:
            into.records += records
            into.loop_lag_ms += lags
            into.cpu_s += time.process_time() - cpu0
            into.wall_s += time.perf_counter() - wall0
            into.window_s += window_s(records)

    async def _tick_progress(self, counters: list[int]) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.progress.update(*counters)

    # -- load models -----------------------------------------------------------------------
    @staticmethod
    async def _closed_loop(one: Callable, concurrency: int, num: int | None, duration: float | None) -> None:
        next_index = 0
        stop_at = time.perf_counter() + duration if duration is not None else math.inf

        async def worker() -> None:
            nonlocal next_index
            free_at = time.perf_counter()
            while (num is None or next_index < num) and free_at < stop_at:
                j = next_index
                next_index += 1
                rec = await one(j, free_at)
                free_at = rec.end  # NOTE: the socket read that completed it; the wake-up after it is client delay
        await asyncio.gather(*(worker() for _ in range(concurrency)))

    @staticmethod
    async def _open_loop(one: Callable, point: LoadPoint, num: int | None, duration: float | None,
                         rng: random.Random) -> None:
        rate = point.request_rate or math.inf
        shape = point.burstiness
        sem = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None
        tasks: list[asyncio.Task] = []

        async def capped(j: int, arrival: float) -> None:
            assert sem is not None
            async with sem:
                await one(j, max(arrival, time.perf_counter()))

        t0 = time.perf_counter()
        offset = 0.0
        j = 0
        while num is None or j < num:
            if j > 0 and not math.isinf(rate):
                offset += rng.gammavariate(shape, 1.0 / (rate * shape))
            if duration is not None and offset >= duration:
                break
            arrival = t0 + offset
            # NOTE: uvloop's timers tick in whole milliseconds against a cached clock and can
            # fire up to ~1 ms early; sleep again until the arrival has really come, so no
            # request goes out before its scheduled time (send lag >= 0).
            while (delay := arrival - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(capped(j, arrival) if sem is not None else one(j, arrival)))
            j += 1
        await asyncio.gather(*tasks)
