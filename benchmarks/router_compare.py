"""Gateway overhead against other routers, in front of replica stand-ins that answer
instantly (fake tokens, no model), all in the same run.

Fronts (each a process of its own, all started before any timing):

- `direct_http`: the bench client straight at the HTTP stand-in
  (`python -m scalellm.bench.standin`, raw asyncio + httptools, near-free per request).
- `direct_grpc`: a grpc.aio client straight at the gRPC stand-in
  (benchmarks/gateway_overhead.py's InstantReplica, the real Replica service).
- `scalellm`: `scalellm gateway --replica <gRPC stand-in> --api-key ...` (default policy).
- `litellm`: the LiteLLM proxy (`litellm --config`, uvicorn + uvloop + httptools, one
  worker) with the HTTP stand-in as a `text-completion-openai/` model; the extras a fair
  user turns off are off (see LITELLM_CONFIG and LITELLM_ENV).
- `sglang`: `sglang-router launch --worker-urls <HTTP stand-in>` (Rust, PyPI
  sglang-router), default policy, --log-level warn.

Every HTTP front is driven by the same lean client (scalellm.bench's Runner/Endpoint,
closed loop, streaming /v1/chat/completions (--api completions for /v1/completions), --output-len one-token chunks, include_usage).
At each concurrency the fronts run in --rounds rounds of --duration seconds, the
order rotated every round so the machine's noise falls on all alike. CPU of every
process (psutil, user+system, children included) is read around every round, so CPU
time per request of each process is measured, not guessed.

Added latency = front's percentile - direct_http's percentile (same client, same
zero-cost backend). For `scalellm` the hop behind it is gRPC to a Python grpc.aio
stand-in, which costs more per request than the raw HTTP stand-in; its CPU is
reported apart (and `direct_grpc` shows that stand-in alone).

    flock /work/cpu.lock python benchmarks/router_compare.py --concurrency 1,16,64,256 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil

from scalellm.bench.endpoint import Endpoint, EndpointConfig
from scalellm.bench.records import BenchRequest
from scalellm.bench.runner import LoadPoint, Runner
from scalellm.bench.stats import percentile, summarize
from scalellm.gateway.launcher import free_port
from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.grpc import replica_pb2_grpc as pb_grpc

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "sk-bench-0123456789abcdef0123456789abcdef"  # one key for the fronts that authenticate

LITELLM_CONFIG = """\
model_list:
  - model_name: standin
    litellm_params:
      model: {provider}/standin
      api_base: http://127.0.0.1:{port}/v1
      api_key: none
litellm_settings:
  set_verbose: false
  turn_off_message_logging: true
  drop_params: true
  request_timeout: 600
general_settings:
  disable_spend_logs: true
"""
# /v1/chat/completions goes through LiteLLM's `openai/` provider (cached clients); its
# /v1/completions path (`text-completion-openai/`) builds a new AsyncOpenAI client, httpx
# client and SSL context per request (py-spy: ~25-30% of its samples in
# ssl.create_default_context), so chat is the fair default.
LITELLM_PROVIDER = {"chat": "openai", "completions": "text-completion-openai"}
# no database, no callbacks, no cost-map download, errors-only logs (uvicorn access log off)
LITELLM_ENV = {"LITELLM_MASTER_KEY": KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}


@dataclass
class Front:
    name: str
    url: str | None  # HTTP fronts; None for direct_grpc
    model: str
    api_key: str | None = None
    proc: subprocess.Popen | None = None
    records: dict[int, list] = field(default_factory=dict)  # concurrency -> records (all rounds)
    windows: dict[int, float] = field(default_factory=dict)
    grpc_lat: dict[int, list[float]] = field(default_factory=dict)
    grpc_ok: dict[int, int] = field(default_factory=dict)
    cpu: dict[int, dict[str, float]] = field(default_factory=dict)  # concurrency -> role -> CPU seconds
    cpu_wall: dict[int, float] = field(default_factory=dict)  # seconds the CPU was read over (warm-up included)
    cpu_requests: dict[int, int] = field(default_factory=dict)  # requests served in that time (warm-up included)


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process and its children (0 when gone)."""
    total = 0.0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def wait_http(url: str, timeout: float, proc: subprocess.Popen, headers: dict[str, str] | None = None,
              body: bytes | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before it was ready")
        try:
            req = urllib.request.Request(url, data=body, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    r.read()
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout:g} s")


def start_processes(a: argparse.Namespace, tmp: str) -> tuple[dict[str, subprocess.Popen], list[Front], int]:
    procs: dict[str, subprocess.Popen] = {}
    log = open(os.path.join(tmp, "fronts.log"), "w")  # noqa: SIM115 - lives as long as the processes

    # the two stand-ins
    http_sb = subprocess.Popen([sys.executable, "-m", "scalellm.bench.standin", "--port", "0"],
                               stdout=subprocess.PIPE, text=True)
    procs["http_standin"] = http_sb
    assert http_sb.stdout is not None
    hp = int(http_sb.stdout.readline().split()[1])
    gp = free_port()
    procs["grpc_standin"] = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); "
         f"from gateway_overhead import run_standin; run_standin({gp})"], stdout=log, stderr=log)
    fronts = [Front("direct_http", f"http://127.0.0.1:{hp}", "standin"),
              Front("direct_grpc", None, "fake")]

    if "scalellm" in a.fronts:
        port = free_port()
        procs["scalellm"] = subprocess.Popen(
            [sys.executable, "-m", "scalellm.entrypoints.cli", "gateway", "--replica", f"127.0.0.1:{gp}",
             "--port", str(port), "--api-key", KEY], stdout=log, stderr=log)
        fronts.append(Front("scalellm", f"http://127.0.0.1:{port}", "fake", KEY, procs["scalellm"]))
    if "litellm" in a.fronts:
        port = free_port()
        cfg = os.path.join(tmp, "litellm.yaml")
        with open(cfg, "w") as f:
            f.write(LITELLM_CONFIG.format(port=hp, provider=LITELLM_PROVIDER[a.api]))
        procs["litellm"] = subprocess.Popen(
            [os.path.join(a.litellm_venv, "bin", "litellm"), "--config", cfg, "--host", "127.0.0.1",
             "--port", str(port), "--num_workers", "1"],
            env={**os.environ, **LITELLM_ENV}, cwd=tmp, stdout=log, stderr=log)
        fronts.append(Front("litellm", f"http://127.0.0.1:{port}", "standin", KEY, procs["litellm"]))
    if "sglang" in a.fronts:
        port = free_port()
        procs["sglang"] = subprocess.Popen(
            [os.path.join(a.router_venv, "bin", "sglang-router"), "launch", "--worker-urls",
             f"http://127.0.0.1:{hp}", "--host", "127.0.0.1", "--port", str(port),
             "--prometheus-port", str(free_port()), "--log-level", "warn"], stdout=log, stderr=log)
        fronts.append(Front("sglang", f"http://127.0.0.1:{port}", "standin", None, procs["sglang"]))

    probe = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for fr in fronts:
        if fr.url is None or fr.name == "direct_http":
            continue
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {KEY}"} if fr.api_key else {})}
        body = json.dumps({"model": fr.model, **json.loads(probe)}).encode()
        wait_http(f"{fr.url}/v1/completions", 180, procs[fr.name], headers, body)
    return procs, [f for f in fronts if f.name in a.fronts], gp


async def direct_grpc_round(port: int, concurrency: int, duration: float, out_len: int,
                            warmup: int) -> tuple[list[float], float, int]:
    """Closed loop straight at the gRPC stand-in: latencies (s), window (s), ok count."""
    lat: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.ReplicaStub(ch)
        req = pb.GenerateRequest(prompt="hello world", params=pb.SamplingParams(max_tokens=out_len))

        async def one() -> float:
            t0 = time.perf_counter()
            async for _ in stub.Generate(req):
                pass
            return time.perf_counter() - t0

        left = [warmup]

        async def warm() -> None:
            while left[0] > 0:
                left[0] -= 1
                await one()

        await asyncio.gather(*(warm() for _ in range(concurrency)))
        stop = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < stop:
                lat.append(await one())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, time.perf_counter() - t0, len(lat)


async def http_round(fr: Front, concurrency: int, duration: float, out_len: int, warmup: int,
                     requests: list[BenchRequest], api: str) -> tuple[list, float]:
    ep = Endpoint(EndpointConfig(url=fr.url or "", model=fr.model, label=fr.name, api_key=fr.api_key, api=api))
    try:
        await ep.prepare()
        runner = Runner([ep], requests, num_warmup=warmup)
        res = (await runner.run([LoadPoint(concurrency=concurrency, duration=duration)]))[0]
    finally:
        ep.close()
    return res.records, res.window_s


def row(fr: Front, c: int, base: dict[str, float] | None) -> dict[str, Any]:
    """One front at one concurrency: latency, throughput, CPU per request per process."""
    if fr.name == "direct_grpc":
        lat = sorted(x * 1e3 for x in fr.grpc_lat[c])
        ok, window = fr.grpc_ok[c], fr.windows[c]
        e2e = {"count": len(lat), "mean": sum(lat) / len(lat), "p50": percentile(lat, 50),
               "p90": percentile(lat, 90), "p99": percentile(lat, 99)}
        out: dict[str, Any] = {"num_ok": ok, "num_errors": 0, "req_per_s": ok / window, "e2e_ms": e2e}
    else:
        s = summarize(fr.records[c], None, fr.windows[c])
        ok = s["num_ok"]
        out = {"num_ok": ok, "num_errors": s["num_errors"], "errors": s["errors"],
               "req_per_s": s["request_throughput"], "e2e_ms": s["e2e_ms"], "ttft_ms": s["ttft_ms"],
               "output_tokens_mean": s["output_tokens"]["mean"]}
        if "server_timings_ms" in s:
            out["server_timings_ms"] = {k: v for k, v in s["server_timings_ms"].items()
                                        if k in ("overhead", "gateway", "network", "decode", "return", "total")}
    if base is not None:
        out["added_p50_ms"] = out["e2e_ms"]["p50"] - base["p50"]
        out["added_p99_ms"] = out["e2e_ms"]["p99"] - base["p99"]
        out["added_mean_ms"] = out["e2e_ms"]["mean"] - base["mean"]
    # CPU was read around whole rounds (warm-up and preflight included): per request over all
    # requests served then, and percent of one core over that wall time
    cpu, wall, n = fr.cpu[c], fr.cpu_wall[c], fr.cpu_requests[c]
    out["cpu_percent"] = {role: 100 * sec / wall for role, sec in cpu.items()}
    out["cpu_ms_per_request"] = {role: 1e3 * sec / max(n, 1) for role, sec in cpu.items()}
    return out


async def run(a: argparse.Namespace, procs: dict[str, subprocess.Popen], fronts: list[Front],
              grpc_port: int) -> list[dict[str, Any]]:
    ps = {name: psutil.Process(p.pid) for name, p in procs.items()}
    me = psutil.Process()
    roles = {"direct_http": ["http_standin"], "direct_grpc": ["grpc_standin"],
             "scalellm": ["scalellm", "grpc_standin"], "litellm": ["litellm", "http_standin"],
             "sglang": ["sglang", "http_standin"]}
    requests = [BenchRequest(i, "hello world", None, -1, a.output_len) for i in range(1024)]
    rows = []
    for c in a.concurrency:
        warmup = max(16, c)  # one request per worker at least: connections opened, code paths warm
        for r in range(a.rounds):
            k = r % len(fronts)
            order = fronts[k:] + fronts[:k]
            if r % 2:
                order = order[::-1]
            for fr in order:
                before = {n: cpu_seconds(p) for n, p in ps.items()}
                me0 = me.cpu_times()
                w0 = time.perf_counter()
                if fr.name == "direct_grpc":
                    lat, window, ok = await direct_grpc_round(grpc_port, c, a.duration, a.output_len, warmup)
                    fr.grpc_lat.setdefault(c, []).extend(lat)
                    fr.grpc_ok[c] = fr.grpc_ok.get(c, 0) + ok
                else:
                    recs, window = await http_round(fr, c, a.duration, a.output_len, warmup, requests, a.api)
                    fr.records.setdefault(c, []).extend(recs)
                    ok = len(recs)
                w1 = time.perf_counter()
                me1 = me.cpu_times()
                after = {n: cpu_seconds(p) for n, p in ps.items()}
                fr.windows[c] = fr.windows.get(c, 0.0) + window
                fr.cpu_wall[c] = fr.cpu_wall.get(c, 0.0) + (w1 - w0)
                fr.cpu_requests[c] = fr.cpu_requests.get(c, 0) + ok + warmup + (fr.name != "direct_grpc")
                used = {n: after[n] - before[n] for n in ps}
                used["client"] = (me1.user + me1.system) - (me0.user + me0.system)
                cpu = fr.cpu.setdefault(c, {})
                for role in [*roles[fr.name], "client"]:
                    cpu[role] = cpu.get(role, 0.0) + used[role]
                idle = {n: v for n, v in used.items() if n not in roles[fr.name] and n != "client" and v > 0.05}
                cpu["others_idle"] = cpu.get("others_idle", 0.0) + sum(idle.values())
                print(f"  c={c:3d} round {r + 1}/{a.rounds} {fr.name:12s} {window:5.1f} s "
                      + " ".join(f"{n}={v:.2f}s" for n, v in used.items() if v > 0.01), flush=True)
        base = row(fronts[0], c, None)["e2e_ms"] if fronts[0].name == "direct_http" else None
        res = {"concurrency": c, "fronts": {fr.name: row(fr, c, base if fr.name != "direct_http" else None)
                                            for fr in fronts}}
        if "direct_grpc" in res["fronts"] and "scalellm" in res["fronts"]:
            g, s = res["fronts"]["direct_grpc"]["e2e_ms"], res["fronts"]["scalellm"]
            s["added_over_direct_grpc_p50_ms"] = s["e2e_ms"]["p50"] - g["p50"]
            s["added_over_direct_grpc_p99_ms"] = s["e2e_ms"]["p99"] - g["p99"]
        rows.append(res)
        print_table(res)
    return rows


def print_table(res: dict[str, Any]) -> None:
    c = res["concurrency"]
    print(f"\nconcurrency {c}")
    print(f"{'front':12s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'+p50':>7s} {'+p99':>7s} "
          f"{'front CPU%':>10s} {'front CPU ms/req':>16s} {'backend CPU ms/req':>18s} {'client CPU%':>11s}")
    for name, f in res["fronts"].items():
        cpu, per = f["cpu_percent"], f["cpu_ms_per_request"]
        front_role = name if name in ("scalellm", "litellm", "sglang") else None
        backend = "grpc_standin" if name in ("scalellm", "direct_grpc") else "http_standin"
        print(f"{name:12s} {f['req_per_s']:8.0f} {f['e2e_ms']['p50']:8.2f} {f['e2e_ms']['p99']:8.2f} "
              f"{f.get('added_p50_ms', 0):7.2f} {f.get('added_p99_ms', 0):7.2f} "
              f"{cpu.get(front_role, 0) if front_role else 0:10.0f} "
              f"{per.get(front_role, 0) if front_role else 0:16.3f} {per.get(backend, 0):18.3f} "
              f"{cpu.get('client', 0):11.0f}")
    print(flush=True)


def environment(a: argparse.Namespace) -> dict[str, Any]:
    def version(venv: str, pkg: str) -> str | None:
        py = os.path.join(venv, "bin", "python")
        if not os.path.exists(py):
            return None
        out = subprocess.run([py, "-c", f"import importlib.metadata as m; print(m.version({pkg!r}))"],
                             capture_output=True, text=True)
        return out.stdout.strip() or None

    return {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "cpu_model": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                               if ln.startswith("model name")), None) if os.path.exists("/proc/cpuinfo") else None,
            "litellm": version(a.litellm_venv, "litellm"), "sglang_router": version(a.router_venv, "sglang-router"),
            "grpcio": grpc.__version__, "time_unix": time.time()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--fronts", default="direct_http,direct_grpc,scalellm,litellm,sglang")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per front per round")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--api", choices=["chat", "completions"], default="chat",
                   help="streamed /v1/chat/completions (default) or /v1/completions")
    p.add_argument("--litellm-venv", default="/work/peers/litellm-venv")
    p.add_argument("--router-venv", default="/work/peers/router-venv")
    p.add_argument("--out", default=os.path.join(HERE, "results", "router_compare.json"))
    a = p.parse_args()
    a.concurrency = [int(x) for x in a.concurrency.split(",")]
    a.fronts = [x.strip() for x in a.fronts.split(",") if x.strip()]
    if a.fronts[0] != "direct_http":
        a.fronts = ["direct_http", *[f for f in a.fronts if f != "direct_http"]]
    tmp = tempfile.mkdtemp(prefix="router_compare_")
    procs: dict[str, subprocess.Popen] = {}
    try:
        t0 = time.perf_counter()
        procs, fronts, gp = start_processes(a, tmp)
        print(f"all fronts ready in {time.perf_counter() - t0:.1f} s: {', '.join(f.name for f in fronts)}", flush=True)
        import uvloop

        rows = uvloop.run(run(a, procs, fronts, gp))
        doc = {"config": {k: v for k, v in vars(a).items()}, "env": environment(a),
               "litellm_config": LITELLM_CONFIG, "litellm_env": {k: v for k, v in LITELLM_ENV.items()
                                                                  if k != "LITELLM_MASTER_KEY"},
               "rows": rows}
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {a.out}")
    finally:
        for p_ in procs.values():
            if p_.poll() is None:
                p_.terminate()
        for p_ in procs.values():
            try:
                p_.wait(15)
            except subprocess.TimeoutExpired:
                p_.kill()
        log = os.path.join(tmp, "fronts.log")
        if sys.exc_info()[0] is not None and os.path.exists(log):
            with open(log) as f:
                print("--- fronts' log (tail) ---\n" + "".join(f.readlines()[-40:]), file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
