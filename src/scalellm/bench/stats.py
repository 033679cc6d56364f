"""Statistics over RequestRecords: per-request latencies and one run's summary.

Definitions (all latencies in ms; a "chunk" is an SSE event that carries output text):
- TTFT: first output chunk's arrival - request sent (streaming only).
- ITL: gaps between consecutive output chunks of a request (every gap is a sample).
- TPOT: (end - first output chunk) / (output tokens - 1), per request with >= 2 tokens.
- e2e: response complete - request sent.
- throughput: ok requests and their tokens / the run's window (first send to last end).
- goodput: ok requests meeting every SLO given, per second of that window.
Percentiles interpolate linearly between order statistics (numpy's default).

What this module does NOT know: HTTP, endpoints, how records were produced.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from scalellm.bench.records import RequestRecord
from scalellm.bench.timings import breakdown

PERCENTILES = (50, 90, 99)


def percentile(sorted_xs: list[float], p: float) -> float:
    """p-th percentile (0..100) of an ascending, non-empty list, linear interpolation."""
    if not sorted_xs:
        raise ValueError("percentile of an empty list")
    k = (len(sorted_xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def distribution(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, min, max (None when empty)."""
    xs = sorted(values)
    if not xs:
        return {"count": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}, "min": None, "max": None}
    return {"count": len(xs), "mean": math.fsum(xs) / len(xs), **{f"p{p}": percentile(xs, p) for p in PERCENTILES},
            "min": xs[0], "max": xs[-1]}


# -- per request -----------------------------------------------------------------------------
def ttft_ms(r: RequestRecord) -> float | None:
    return None if r.first_token_at is None else (r.first_token_at - r.sent) * 1e3


def e2e_ms(r: RequestRecord) -> float:
    return (r.end - r.sent) * 1e3


def tpot_ms(r: RequestRecord) -> float | None:
    if r.first_token_at is None or r.output_tokens < 2:
        return None
    return (r.end - r.first_token_at) * 1e3 / (r.output_tokens - 1)


def itls_ms(r: RequestRecord) -> list[float]:
    t = r.chunk_times
    return [(t[i] - t[i - 1]) * 1e3 for i in range(1, len(t))]


@dataclass(frozen=True)
class SLO:
    """Per-request limits; None means no limit on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """"ttft_ms=500,tpot_ms=50" (keys: ttft_ms, tpot_ms, e2e_ms)."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in ("ttft_ms", "tpot_ms", "e2e_ms"):
                raise ValueError(f"bad SLO {part!r}: use ttft_ms=N, tpot_ms=N, e2e_ms=N")
            try:
                values[key] = float(val)
            except ValueError:
                raise ValueError(f"bad SLO value in {part!r}") from None
        return cls(**values)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms), ("e2e_ms", self.e2e_ms))
                if v is not None}

    def is_met(self, r: RequestRecord) -> bool:
        if not r.is_ok:
            return False
        if self.ttft_ms is not None:
            t = ttft_ms(r)
            if t is None or t > self.ttft_ms:
                return False
        if self.tpot_ms is not None:
            t = tpot_ms(r)
            if t is not None and t > self.tpot_ms:  # a 1-token answer has no TPOT to miss
                return False
        return self.e2e_ms is None or e2e_ms(r) <= self.e2e_ms


# -- one run -------------------------------------------------------------------------------------
def window_s(records: list[RequestRecord]) -> float:
    """First request sent to last response complete (seconds)."""
    if not records:
        return 0.0
    return max(max(r.end for r in records) - min(r.sent or r.scheduled for r in records), 1e-9)


def summarize(records: list[RequestRecord], slo: SLO | None = None, duration_s: float | None = None
              ) -> dict[str, Any]:
    """The summary of one run (one endpoint at one load point). `duration_s` overrides the
    window for throughputs (an A/B run adds up its rounds' windows)."""
    ok = [r for r in records if r.is_ok]
    duration = window_s(records) if duration_s is None else duration_s
    n_in = sum(max(r.input_tokens, 0) for r in ok)
    n_out = sum(r.output_tokens for r in ok)

    def rate(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    summary: dict[str, Any] = {
        "num_requests": len(records), "num_ok": len(ok), "num_errors": len(records) - len(ok),
        "duration_s": duration,
        "request_throughput": rate(len(ok)),
        "input_token_throughput": rate(n_in), "output_token_throughput": rate(n_out),
        "total_token_throughput": rate(n_in + n_out),
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "ttft_ms": distribution(t for r in ok if (t := ttft_ms(r)) is not None),
        "tpot_ms": distribution(t for r in ok if (t := tpot_ms(r)) is not None),
        "itl_ms": distribution(x for r in ok for x in itls_ms(r)),
        "e2e_ms": distribution(e2e_ms(r) for r in ok),
        "input_tokens": distribution(r.input_tokens for r in ok if r.input_tokens >= 0),
        "output_tokens": distribution(r.output_tokens for r in ok),
        "errors": dict(Counter(r.error for r in records if r.error is not None)),
        "error_examples": _error_examples(records),
        "output_token_sources": dict(Counter(r.output_token_source for r in ok)),
        "client": {"send_lag_ms": distribution((r.sent - r.scheduled) * 1e3 for r in records if r.sent)},
    }
    if slo is not None and slo.as_dict():
        met = sum(1 for r in ok if slo.is_met(r))
        summary["goodput"] = {"slo": slo.as_dict(), "num_met": met,
                              "fraction": met / len(records) if records else 0.0,
                              "request_throughput": rate(met)}
    summary.update(_server_side(ok))
    return summary


def _error_examples(records: list[RequestRecord]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in records:
        if r.error is not None and r.error not in out:
            out[r.error] = r.error_message
    return out


def _server_side(ok: list[RequestRecord]) -> dict[str, Any]:
    """Server-reported timings: each name's distribution and the mean breakdown (ms)."""
    timed = [r for r in ok if r.server_timings]
    if not timed:
        return {}
    names = sorted({n for r in timed for n in r.server_timings})
    parts: dict[str, list[float]] = {}
    for r in timed:
        for name, v in breakdown(r.server_timings, e2e_ms(r)).items():
            parts.setdefault(name, []).append(v)
    return {
        "server_timings_ms": {n: distribution(r.server_timings[n] for r in timed if n in r.server_timings)
                              for n in names},
        "breakdown_ms": {n: math.fsum(v) / len(v) for n, v in parts.items()},
        "num_with_server_timings": len(timed),
    }


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """B / A for the headline numbers of two summaries (throughputs: >1 is B faster;
    latencies: <1 is B faster)."""
    keys: list[tuple[str, ...]] = [("request_throughput",), ("output_token_throughput",), ("total_token_throughput",)]
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        keys += [(metric, "mean"), (metric, "p50"), (metric, "p99")]
    out: dict[str, float | None] = {}
    for path in keys:
        va: Any = a
        vb: Any = b
        for k in path:
            va = va.get(k) if isinstance(va, dict) else None
            vb = vb.get(k) if isinstance(vb, dict) else None
        out[".".join(path)] = (vb / va) if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else None
    return out
