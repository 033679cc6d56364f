"""PNG charts of a bench run, for a person to look at (matplotlib, Agg backend).

- latency.png: TTFT, TPOT, ITL, e2e percentiles (p50 solid, p90 dashed, p99 dotted)
  against load (concurrency or request rate), one colour per endpoint.
- throughput.png: requests/s and output tokens/s against load.
- breakdown.png: mean latency breakdown from server timings as stacked bars
  (only when the server returned timings).
- compare.png: A and B side by side per load point (only with two endpoints).

What this module does NOT know: how the summaries were measured; it reads the
result dict that results.build_result writes.
"""

from __future__ import annotations

import os
from typing import Any

_PCT_STYLE = {"p50": "-", "p90": "--", "p99": ":"}
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
_METRICS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("e2e latency", "e2e_ms"))


def write_plots(result: dict[str, Any], out_dir: str) -> list[str]:
    """Write the charts; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    runs = result["runs"]
    labels = list(dict.fromkeys(r["endpoint"] for r in runs))
    kind = runs[0]["point"]["kind"] if runs else "concurrency"
    xlabel = "concurrency (requests in flight)" if kind == "concurrency" else "request rate (req/s)"
    paths = []

    def series(label: str) -> tuple[list[float], list[dict[str, Any]]]:
        rows = sorted((r for r in runs if r["endpoint"] == label), key=lambda r: r["point"]["value"])
        return [r["point"]["value"] for r in rows], [r["summary"] for r in rows]

    def log_x(ax: Any, xs: list[float]) -> None:
        finite = [x for x in xs if x not in (float("inf"),) and x > 0]
        if finite and max(finite) / min(finite) >= 8:
            ax.set_xscale("log", base=2)

    # latency percentiles vs load
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, key) in zip(axes.flat, _METRICS, strict=True):
        for ci, label in enumerate(labels):
            xs, sums = series(label)
            for pct, style in _PCT_STYLE.items():
                ys = [s[key][pct] for s in sums]
                if any(y is not None for y in ys):
                    ax.plot(xs, [float("nan") if y is None else y for y in ys], style, marker="o",
                            color=_COLORS[ci % len(_COLORS)], label=f"{label} {pct}")
            log_x(ax, xs)
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("latency percentiles vs load")
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "latency.png"))
    plt.close(fig)

    # throughput vs load
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, key) in zip(axes, (("requests/s", "request_throughput"),
                                       ("output tokens/s", "output_token_throughput")), strict=True):
        for ci, label in enumerate(labels):
            xs, sums = series(label)
            ax.plot(xs, [s[key] for s in sums], "-", marker="o", color=_COLORS[ci % len(_COLORS)], label=label)
            log_x(ax, xs)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("throughput vs load")
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "throughput.png"))
    plt.close(fig)

    # breakdown as stacked bars
    with_parts = [r for r in runs if r["summary"].get("breakdown_ms")]
    if with_parts:
        names = list(dict.fromkeys(n for r in with_parts for n in r["summary"]["breakdown_ms"]))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(with_parts) + 3), 5))
        xt = [f"{r['endpoint']}\n{r['point']['label']}" for r in with_parts]
        bottom = [0.0] * len(with_parts)
        cmap = plt.get_cmap("tab10")
        for ni, name in enumerate(names):
            vals = [r["summary"]["breakdown_ms"].get(name, 0.0) for r in with_parts]
            ax.bar(xt, vals, bottom=bottom, label=name, color=cmap(ni % 10))
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.plot(xt, [r["summary"]["e2e_ms"]["mean"] for r in with_parts], "k_", markersize=30, mew=2,
                label="client e2e (mean)")
        ax.set_ylabel("ms (mean per request)")
        ax.set_title("latency breakdown from server timings\n(client_network = client e2e - server total)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "breakdown.png"))
        plt.close(fig)

    # comparison bars
    if len(labels) >= 2:
        a, b = labels[0], labels[1]
        xa, sa = series(a)
        xb, sb = series(b)
        shared = [x for x in xa if x in xb]
        metrics = (("output tok/s", lambda s: s["output_token_throughput"]), ("TTFT p50 ms", lambda s: s["ttft_ms"]["p50"]),
                   ("TPOT p50 ms", lambda s: s["tpot_ms"]["p50"]), ("e2e p50 ms", lambda s: s["e2e_ms"]["p50"]))
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4))
        idx = list(range(len(shared)))
        for ax, (title, get) in zip(axes, metrics, strict=True):
            va = [get(sa[xa.index(x)]) or 0.0 for x in shared]
            vb = [get(sb[xb.index(x)]) or 0.0 for x in shared]
            ax.bar([i - 0.2 for i in idx], va, 0.4, label=a, color=_COLORS[0])
            ax.bar([i + 0.2 for i in idx], vb, 0.4, label=b, color=_COLORS[1])
            for i, (u, v) in enumerate(zip(va, vb, strict=True)):
                if u:
                    ax.annotate(f"x{v / u:.2f}", (i + 0.2, v), ha="center", va="bottom", fontsize=8)
            ax.set_xticks(idx, [_point_label(kind, x) for x in shared])
            ax.set_title(title)
            ax.legend(fontsize=8)
        fig.suptitle(f"{b} vs {a} (annotations: {b} / {a})")
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "compare.png"))
        plt.close(fig)
    return paths


def _point_label(kind: str, x: float) -> str:
    if kind == "concurrency":
        return f"c={int(x)}"
    return "inf" if x == float("inf") else f"{x:g}/s"


def _save(fig: Any, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return path
