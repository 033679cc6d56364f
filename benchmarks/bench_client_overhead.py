"""How much the `scalellm bench` client itself adds, against a stand-in that answers
instantly (scalellm.bench.standin: fake tokens, no model, its own process).

Two runs, both closed loop at --concurrency (default 256) through the real bench
runner and client:

- paced: every stream gets a token every --itl-ms (default 50 ms: 256 streams x 20
  tok/s = 5,120 tok/s). Each chunk carries the stand-in's perf_counter() at its
  write; the client's socket-read stamp minus that is the chunk's delay as the bench
  sees it: loopback + kernel + waiting for the client's event loop. Also reported:
  send lag (worker free -> next request written), the event loop's ready-queue delay,
  and CPU of the client and the stand-in.
- flat out: the stand-in writes all --max-output-len tokens of a response at once;
  output tokens/s here is the most the client handles (the two processes share the
  machine's cores, so this is a lower bound).
- paced, spread (--spread-rate, default 80 req/s): the paced run as an open loop, so
  the streams' tokens do not all fall due at the same instant. In the closed loop all
  --concurrency streams start together and stay in step (as a real server's batched
  decode steps would put them), so each tick is one burst of --concurrency chunks that
  one process reads one after another; this run shows the delay without such bursts.

    python benchmarks/bench_client_overhead.py            # ~40 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import psutil

from scalellm.bench.endpoint import Endpoint, EndpointConfig
from scalellm.bench.openai_sink import OpenAISink
from scalellm.bench.records import BenchRequest, RequestRecord
from scalellm.bench.runner import LoadPoint, Runner
from scalellm.bench.stats import distribution


class StampedSink(OpenAISink):
    """The bench's own sink, plus: each chunk's delay = socket-read stamp - stand-in's write stamp."""

    __slots__ = ()
    delays_ms: list[float] = []

    def _event(self, name: bytes, payload: bytes, t: float) -> None:
        k = payload.rfind(b'"ts":')
        if k >= 0:
            StampedSink.delays_ms.append((t - float(payload[k + 5:payload.index(b"}", k)])) * 1e3)
        super()._event(name, payload, t)


def start_standin(itl_ms: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "scalellm.bench.standin", "--port", "0", "--itl-ms", str(itl_ms),
                             "--stamp"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, int(line.split()[1])


async def one_run(port: int, concurrency: int, num_requests: int, output_len: int, standin: psutil.Process,
                  rate: float | None = None) -> dict:
    ep = Endpoint(EndpointConfig(url=f"http://127.0.0.1:{port}", model="standin"))
    await ep.prepare()
    requests = [BenchRequest(i, "hello world", None, 3, output_len) for i in range(num_requests + concurrency)]

    def sink_factory(endpoint: Endpoint, req: BenchRequest, t: float) -> tuple[RequestRecord, StampedSink]:
        rec = RequestRecord(request_id=req.request_id, endpoint=endpoint.label, scheduled=t,
                            expected_output_len=req.output_len)
        return rec, StampedSink(rec)

    runner = Runner([ep], requests, num_warmup=concurrency, sink_factory=sink_factory)
    StampedSink.delays_ms = []
    standin.cpu_percent()
    point = (LoadPoint(request_rate=rate, num_requests=num_requests) if rate else
             LoadPoint(concurrency=concurrency, num_requests=num_requests))
    results = await runner.run([point])
    standin_cpu = standin.cpu_percent()
    ep.close()
    s = results[0].summary
    return {
        "concurrency": concurrency, "request_rate": rate, "num_requests": num_requests, "output_len": output_len,
        "num_ok": s["num_ok"], "errors": s["errors"], "duration_s": s["duration_s"],
        "output_tokens_per_s": s["output_token_throughput"], "requests_per_s": s["request_throughput"],
        "chunk_delay_ms": distribution(StampedSink.delays_ms[-s["total_output_tokens"]:]),
        "send_lag_ms": s["client"]["send_lag_ms"], "loop_lag_ms": s["client"]["loop_lag_ms"],
        "client_cpu_percent": s["client"]["cpu_percent"], "standin_cpu_percent": standin_cpu,
        "itl_ms": s["itl_ms"], "ttft_ms": s["ttft_ms"],
    }


def _fmt(d: dict) -> str:
    return f"p50 {d['p50']:.3f} p90 {d['p90']:.3f} p99 {d['p99']:.3f} max {d['max']:.3f} ms"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--itl-ms", type=float, default=50.0)
    p.add_argument("--output-len", type=int, default=64, help="paced run: tokens per request")
    p.add_argument("--num-requests", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=256, help="flat-out run: tokens per request")
    p.add_argument("--max-num-requests", type=int, default=2048)
    p.add_argument("--spread-rate", type=float, default=80.0,
                   help="paced, spread run: open-loop arrivals/s (80 x 64 tokens x 50 ms ~ 256 in flight); 0: skip")
    p.add_argument("--out", default="benchmarks/results/bench_client_overhead.json")
    a = p.parse_args()
    import uvloop

    out: dict = {"config": vars(a), "machine": {"cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                                                "start_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    runs = [("paced", a.itl_ms, a.num_requests, a.output_len, None),
            ("flat_out", 0.0, a.max_num_requests, a.max_output_len, None)]
    if a.spread_rate:
        runs.append(("paced_spread", a.itl_ms, a.num_requests, a.output_len, a.spread_rate))
    for name, itl, n, olen, rate in runs:
        proc, port = start_standin(itl)
        try:
            res = uvloop.run(one_run(port, a.concurrency, n, olen, psutil.Process(proc.pid), rate))
        finally:
            proc.terminate()
            proc.wait(10)
        out[name] = res
        load = f"rate={rate:g}/s" if rate else f"c={a.concurrency}"
        print(f"{name}: {load} {res['num_ok']}/{n} ok, {res['output_tokens_per_s']:,.0f} out tok/s, "
              f"client CPU {res['client_cpu_percent']:.0f}%, stand-in CPU {res['standin_cpu_percent']:.0f}%\n"
              f"  chunk delay (client read - stand-in write): {_fmt(res['chunk_delay_ms'])}\n"
              f"  send lag: {_fmt(res['send_lag_ms'])}\n  loop ready-queue lag: {_fmt(res['loop_lag_ms'])}",
              flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
