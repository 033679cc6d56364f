"""The result document of a run (`--out result.json`): configuration, environment,
endpoints, workload, every raw per-request record, each run's summary, comparison.

Schema (`"schema": "scalellm.bench/1"`), top level:
  config       the command's options
  environment  machine, Python, package versions, start time (UTC), load average
  endpoints    [{label, url, model, api, stream, notes}]
  workload     {num_requests, num_warmup, input_len, output_len, token_counter, fit_misses, ...}
  runs         [{endpoint, point{kind,value,label,...}, summary{...}, records[...]}]
  comparison   [{point, a, b, b_over_a{metric: ratio}}]   (empty without --compare)
Record times are seconds relative to `t0_perf` (a perf_counter reading taken when the
run started; `t0_unix` is the wall clock at that moment).

What this module does NOT know: how the numbers were measured.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from typing import Any

from scalellm.bench.endpoint import Endpoint
from scalellm.bench.runner import PointResult

SCHEMA = "scalellm.bench/1"
TOP_KEYS = ("schema", "config", "environment", "endpoints", "workload", "runs", "comparison")


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    versions = {}
    for pkg in ("scalellm", "uvloop", "httptools", "msgspec", "rich", "matplotlib"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env = {
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "processor": _cpu_model(), "cpu_count": os.cpu_count(), "hostname": platform.node(),
        "start_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "argv": sys.argv, "versions": versions,
    }
    env.update(extra or {})
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _clean(v: Any) -> Any:
    """JSON has no inf/nan: they become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def build_result(*, config: dict[str, Any], env: dict[str, Any], endpoints: list[Endpoint],
                 workload: dict[str, Any], results: list[PointResult], comparison: list[dict[str, Any]],
                 t0_perf: float, t0_unix: float, keep_text: bool = False) -> dict[str, Any]:
    doc = {
        "schema": SCHEMA,
        "config": config,
        "environment": {**env, "t0_perf": t0_perf, "t0_unix": t0_unix},
        "endpoints": [{"label": ep.label, "url": ep.config.base_url, "model": ep.model, "api": ep.config.api,
                       "stream": ep.config.is_stream, "ignore_eos": ep.config.ignore_eos, "notes": ep.notes}
                      for ep in endpoints],
        "workload": workload,
        "runs": [{"endpoint": r.endpoint, "point": r.point.as_dict(), "summary": r.summary,
                  "records": [rec.to_json(t0_perf, keep_text) for rec in r.records]} for r in results],
        "comparison": comparison,
    }
    return _clean(doc)


def write_result(doc: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
