"""What a person sees: a live progress bar while a run goes, rich tables at its end.

What this module does NOT know: how the numbers were measured (it reads summaries,
the dicts stats.summarize makes) or files (results.py, plots.py).
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scalellm.bench.runner import PointResult


class RichProgress:
    """runner.Progress on a rich progress bar (stderr)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = 0
        self._t0 = 0.0

    def begin(self, label: str, total: int | None, duration: float | None) -> None:
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                                  transient=False, refresh_per_second=4)
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, info="")
        self._t0 = time.perf_counter()

    def update(self, done: int, errors: int, output_tokens: int) -> None:
        if self._progress is None:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        info = f"{output_tokens / dt:8.1f} out tok/s" + (f"  [red]{errors} errors" if errors else "")
        self._progress.update(self._task, completed=done, info=info)

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _pair(dist: dict[str, Any], digits: int = 1) -> str:
    return f"{_f(dist.get('p50'), digits)} / {_f(dist.get('p99'), digits)}"


def print_report(results: list[PointResult], comparison: list[dict[str, Any]], notes: list[str],
                 console: Console | None = None) -> None:
    con = console
    if con is None:
        con = Console()
        if not con.is_terminal:
            con = Console(width=160)  # files and pipes: do not wrap tables at 80 columns
    labels = list(dict.fromkeys(r.endpoint for r in results))
    for label in labels:
        rows = [r for r in results if r.endpoint == label]
        t = Table(title=f"endpoint {label}: throughput", title_justify="left")
        for col in ("load", "ok", "err", "req/s", "in tok/s", "out tok/s", "total tok/s", "TTFT p50", "TPOT p50",
                    "e2e p50"):
            t.add_column(col, justify="right")
        has_goodput = any("goodput" in r.summary for r in rows)
        if has_goodput:
            t.add_column("goodput req/s (SLO met)", justify="right")
        for r in rows:
            s = r.summary
            cells = [r.point.label, str(s["num_ok"]), str(s["num_errors"]), _f(s["request_throughput"], 2),
                     _f(s["input_token_throughput"]), _f(s["output_token_throughput"]),
                     _f(s["total_token_throughput"]), _f(s["ttft_ms"]["p50"]), _f(s["tpot_ms"]["p50"]),
                     _f(s["e2e_ms"]["p50"])]
            if has_goodput:
                g = s.get("goodput")
                cells.append(f"{g['request_throughput']:.2f} ({100 * g['fraction']:.0f}%)" if g else "-")
            t.add_row(*cells)
        con.print(t)

        d = Table(title=f"endpoint {label}: latency distribution (ms)", title_justify="left")
        for col in ("load", "metric", "mean", "p50", "p90", "p99", "max"):
            d.add_column(col, justify="right")
        for r in rows:
            for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("e2e", "e2e_ms")):
                dist = r.summary[key]
                if dist["count"]:
                    d.add_row(r.point.label, name, *(_f(dist[k]) for k in ("mean", "p50", "p90", "p99", "max")))
        con.print(d)

        parts = [r for r in rows if r.summary.get("breakdown_ms")]
        if parts:
            names = list(dict.fromkeys(n for r in parts for n in r.summary["breakdown_ms"]))
            b = Table(title=f"endpoint {label}: latency breakdown from server timings (mean ms)",
                      title_justify="left")
            for col in ("load", *names, "e2e"):
                b.add_column(col, justify="right")
            for r in parts:
                b.add_row(r.point.label, *(_f(r.summary["breakdown_ms"].get(n), 2) for n in names),
                          _f(r.summary["e2e_ms"]["mean"], 2))
            con.print(b)

        c = Table(title=f"endpoint {label}: client (this process)", title_justify="left")
        for col in ("load", "send lag p50 / p99 ms", "loop lag p99 / max ms", "CPU %", "token counts from"):
            c.add_column(col, justify="right")
        for r in rows:
            cl = r.summary["client"]
            lag = cl["loop_lag_ms"]
            c.add_row(r.point.label, _pair(cl["send_lag_ms"], 2), f"{_f(lag['p99'], 2)} / {_f(lag['max'], 2)}",
                      _f(cl["cpu_percent"], 0), ", ".join(f"{k}:{v}" for k, v in r.summary["output_token_sources"].items()))
        con.print(c)

        errs = [r for r in rows if r.summary["errors"]]
        for r in errs:
            for kind, n in r.summary["errors"].items():
                con.print(f"[red]{label} {r.point.label}: {n} x {kind}: {r.summary['error_examples'].get(kind, '')}")

    if comparison:
        t = Table(title=f"comparison: {comparison[0]['b']} / {comparison[0]['a']} "
                        "(throughput > 1: B faster; latency < 1: B faster)", title_justify="left")
        cols = [("req/s", "request_throughput"), ("out tok/s", "output_token_throughput"),
                ("TTFT p50", "ttft_ms.p50"), ("TTFT p99", "ttft_ms.p99"), ("TPOT p50", "tpot_ms.p50"),
                ("ITL p50", "itl_ms.p50"), ("e2e p50", "e2e_ms.p50"), ("e2e p99", "e2e_ms.p99")]
        t.add_column("load", justify="right")
        for name, _ in cols:
            t.add_column(name, justify="right")
        for row in comparison:
            t.add_row(row["point"]["label"], *(_f(row["b_over_a"].get(k), 3) for _, k in cols))
        con.print(t)
    for note in notes:
        con.print(f"[yellow]note: {note}")
