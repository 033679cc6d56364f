"""Start-up time and memory of `scalellm serve` with the default model (issue 7 targets:
ready within 5 s, RSS of gateway + replica together within 1 GB).

Each repeat starts `scalellm serve` (gateway + 1 replica, default flags, --log-level
INFO) and measures:
- start-up: spawn -> the first 200 from /ready, and the phases from the log lines'
  timestamps (the processes' own `ready`/`loaded` lines, see PHASES);
- RSS and PSS (proportional: shared pages split between the processes that map them,
  so the sum is the memory the tree really holds) per process role when ready (1 s
  after /ready), with --settle after that many seconds idle too (the warm-up step and
  the KV-cache prefault done; the engine core trims its heap after 5 s idle), during a
  load (--load-requests streaming requests of ~120 prompt tokens, --load-max-tokens out,
  at --load-concurrency; which touches KV pages and the allocator's working set) the peak
  of the summed RSS (sampled every 0.25 s), 1 s after it, and with --settle idle again.

    flock /work/cpu.lock python benchmarks/startup_rss.py             # ~1 min
    python benchmarks/startup_rss.py --serve-args "--quantization int8"
    # issue 7's measurement: settled (15 s idle), during and after a c=64 run of 128 x ~128 in / 128 out
    python benchmarks/startup_rss.py --repeats 2 --settle 15 --load-requests 128 --load-concurrency 64 \\
        --load-max-tokens 128 --out benchmarks/results/s21_zen4/startup_rss_default.json
    # the smallest footprint:
    python benchmarks/startup_rss.py --repeats 2 --settle 15 --load-requests 128 --load-concurrency 64 \\
        --load-max-tokens 128 --serve-args "--quantization int8 --kv-cache-dtype int8 --kv-cache-memory 0.25"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request

import psutil

from scalellm.gateway.launcher import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
# log line -> phase name; the first match of each counts, timed from the spawn
PHASES = [
    (re.compile(r"engine core process started"), "core_process_started"),
    (re.compile(r"torch and model code imported"), "core_torch_imported"),
    (re.compile(r"loaded .* in [\d.]+s"), "core_weights_loaded"),
    (re.compile(r"engine ready:"), "core_engine_ready"),
]


def role(p: psutil.Process, top: int) -> str:
    cmd = " ".join(p.cmdline())
    if p.pid == top:
        return "gateway"
    if "core_process" in cmd or "spawn_main" in cmd or "multiprocessing" in cmd:
        return "engine_core"
    if " replica" in cmd:
        return "replica_frontend"
    return "other"


def memory(top: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    root = psutil.Process(top)
    for p in [root, *root.children(recursive=True)]:
        try:
            m = p.memory_full_info()
            r = role(p, top)
        except psutil.Error:
            continue
        d = out.setdefault(r, {"rss_mb": 0.0, "pss_mb": 0.0, "uss_mb": 0.0})
        d["rss_mb"] += m.rss / 2**20
        d["pss_mb"] += m.pss / 2**20
        d["uss_mb"] += m.uss / 2**20
    out["total"] = {k: sum(v[k] for v in out.values()) for k in ("rss_mb", "pss_mb", "uss_mb")}
    return out


def load(url: str, n: int, concurrency: int = 16, max_tokens: int = 16) -> None:
    body = json.dumps({"model": "x", "prompt": "Hello " * 120, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True}).encode()
    models = json.load(urllib.request.urlopen(f"{url}/v1/models"))
    body = body.replace(b'"x"', json.dumps(models["data"][0]["id"]).encode())
    sem = threading.Semaphore(concurrency)

    def one() -> None:
        with sem:
            req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                r.read()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def one_start(serve_args: list[str], load_requests: int, settle_s: float = 0.0, load_concurrency: int = 16,
              load_max_tokens: int = 16) -> dict:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "scalellm.entrypoints.cli", "--log-level", "INFO", "serve",
                             "--port", str(port), *serve_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    phases: dict[str, float] = {}
    lines: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            for rx, name in PHASES:
                if name not in phases and rx.search(line):
                    phases[name] = time.perf_counter() - t0

    threading.Thread(target=reader, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("serve exited:\n" + "\n".join(lines[-20:]))
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        ready_s = time.perf_counter() - t0
        time.sleep(1.0)  # let start-up garbage settle
        at_ready = memory(proc.pid)
        settled = None
        if settle_s > 0:  # idle: the warm-up step and the KV-cache prefault have run
            time.sleep(settle_s)
            settled = memory(proc.pid)
        peak = {"rss_mb": 0.0}
        done = threading.Event()

        def sample() -> None:  # the tree's summed RSS (cheap: no smaps) every 0.25 s during the load
            while not done.wait(0.25):
                try:
                    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                    peak["rss_mb"] = max(peak["rss_mb"], sum(p.memory_info().rss for p in procs) / 2**20)
                except psutil.Error:
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load(url, load_requests, load_concurrency, load_max_tokens)
        done.set()
        sampler.join()
        time.sleep(1.0)
        after_load = memory(proc.pid)
        after_load_settled = None
        if settle_s > 0:  # idle again after the load
            time.sleep(settle_s)
            after_load_settled = memory(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    out = {"ready_s": ready_s, "phases_s": phases, "memory_at_ready": at_ready, "memory_after_load": after_load,
           "peak_rss_mb_during_load": peak["rss_mb"], "log_tail": lines[-12:]}
    if settled is not None:
        out["memory_settled"] = settled
        out["memory_after_load_settled"] = after_load_settled
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--serve-args", default="")
    p.add_argument("--load-requests", type=int, default=32)
    p.add_argument("--load-concurrency", type=int, default=16)
    p.add_argument("--load-max-tokens", type=int, default=16)
    p.add_argument("--settle", type=float, default=0.0,
                   help="also measure after this many seconds idle past ready (0: skip)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "startup_rss.json"))
    a = p.parse_args()
    runs = [one_start(shlex.split(a.serve_args), a.load_requests, a.settle, a.load_concurrency, a.load_max_tokens)
            for _ in range(a.repeats)]
    out = {"config": vars(a), "machine": {"cores": os.cpu_count(),
                                          "start_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
           "runs": runs, "ready_s_min": min(r["ready_s"] for r in runs),
           "ready_s_median": sorted(r["ready_s"] for r in runs)[len(runs) // 2]}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    for r in runs:
        mem = r["memory_at_ready"]
        print(f"ready {r['ready_s']:.2f} s  phases " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items()))
        print(f"  peak total RSS during the load: {r['peak_rss_mb_during_load']:.0f} MB")
        for key in ("memory_at_ready", "memory_settled", "memory_after_load", "memory_after_load_settled"):
            if key not in r:
                continue
            mem = r[key]
            print(f"  {key}: " + ", ".join(f"{k} rss {v['rss_mb']:.0f} / pss {v['pss_mb']:.0f} MB"
                                           for k, v in mem.items()))
    print(f"ready: min {out['ready_s_min']:.2f} s, median {out['ready_s_median']:.2f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
