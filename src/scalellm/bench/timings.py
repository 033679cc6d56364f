"""Server-reported per-request timings, read generically.

Two sources, both optional: the `Server-Timing` response header
(`gateway;dur=1.2, queue;dur=0.4, total;dur=31`) and a `usage.timings` object in the
final response / streamed usage chunk (`{"gateway_ms": 1.2, "prefill_ms": 20}`).
Names are normalized (lower case, a trailing `_ms` dropped) and merged, the usage
object winning on a clash (it is written after the whole response is known).

The breakdown shown to a person is whatever subset of `BREAKDOWN_ORDER` is present,
in that order (every name is also summarized on its own). ScaleLLM's gateway sends
consecutive stages (gateway, network = gateway->replica hop, tokenize, queue,
prefill, decode, return) that add up to its `total`; `client_network` is derived
here as the client's end-to-end latency minus the server's `total` (or `gateway` +
`replica` when no total is given): the client<->server wire plus client delay.

What this module does NOT know: which server sent the timings or what they mean
beyond their names.
"""

from __future__ import annotations

from typing import Any

# components of a request's life, outermost first; "total"/"replica" are envelopes, not parts
BREAKDOWN_ORDER = ("client_network", "gateway", "network", "tokenize", "queue", "prefill", "decode", "return")


def normalize_name(name: str) -> str:
    n = name.strip().lower()
    for suffix in ("_ms", "-ms"):
        if n.endswith(suffix):
            n = n[: -len(suffix)]
    return n


def parse_server_timing(value: str) -> dict[str, float]:
    """`a;dur=1.5;desc="x", b;dur=2` -> {"a": 1.5, "b": 2.0}; entries without dur are skipped."""
    out: dict[str, float] = {}
    for entry in value.split(","):
        parts = [p.strip() for p in entry.split(";")]
        if not parts[0]:
            continue
        for param in parts[1:]:
            key, _, val = param.partition("=")
            if key.strip().lower() == "dur":
                try:
                    out[normalize_name(parts[0])] = float(val.strip().strip('"'))
                except ValueError:
                    pass
                break
    return out


def from_usage(timings: Any) -> dict[str, float]:
    """A usage.timings object -> {name: ms}; non-numeric values are ignored."""
    if not isinstance(timings, dict):
        return {}
    return {normalize_name(str(k)): float(v) for k, v in timings.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def server_total(timings: dict[str, float]) -> float | None:
    """The server's whole time for the request (ms), if the timings say it."""
    for name in ("total", "server"):
        if name in timings:
            return timings[name]
    if "gateway" in timings and "replica" in timings:
        return timings["gateway"] + timings["replica"]
    if "replica" in timings:
        return timings["replica"]
    return None


def breakdown(timings: dict[str, float], e2e_ms: float) -> dict[str, float]:
    """Ordered parts of one request's latency (ms): the BREAKDOWN_ORDER names the server
    gave, plus derived client_network. Other names are not parts (they may overlap)."""
    if not timings:
        return {}
    parts: dict[str, float] = {}
    total = server_total(timings)
    for name in BREAKDOWN_ORDER:
        if name == "client_network":
            if total is not None:
                parts[name] = max(e2e_ms - total, 0.0)
        elif name in timings:
            parts[name] = timings[name]
    return parts
