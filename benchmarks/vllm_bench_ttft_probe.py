"""Where the TTFT that `vllm bench serve` reports above the truth comes from.

Runs vLLM's own request function (vllm.benchmarks.lib.endpoint_request_func, the one
`vllm bench serve` uses, on an aiohttp session set up as vllm's serve.py sets it up)
against our stand-in with `--ttft-ms 100 --stamp`: every chunk carries the stand-in's
perf_counter() at its write (CLOCK_MONOTONIC, the same clock in both processes). Per
request it splits vLLM's TTFT into
  pre   vllm's start stamp -> aiohttp's ClientRequest.send (the client preparing the request)
  wire  ClientRequest.send -> the stand-in had the request (first write stamp - 100 ms)
  recv  the stand-in's first write -> vllm read it
with the session's trust_env=True (as vllm has it) and False. Run with vLLM's venv:

    /work/vllm-venv/bin/python benchmarks/vllm_bench_ttft_probe.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time

import aiohttp
from aiohttp import client_reqrep
from vllm.benchmarks.lib import endpoint_request_func as erf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TTFT_S = 0.1
_first: dict = {}  # task -> (client read time, stand-in write stamp) of its first chunk
_sent: dict = {}  # task -> time aiohttp's ClientRequest.send began

_add_chunk = erf.StreamedResponseHandler.add_chunk
_send = client_reqrep.ClientRequest.send


def add_chunk(self, chunk: bytes) -> list[str]:
    t = time.perf_counter()
    task = asyncio.current_task()
    if task not in _first and (m := re.search(rb'"ts":([0-9.]+)', chunk)):
        _first[task] = (t, float(m.group(1)))
    return _add_chunk(self, chunk)


async def send(self, conn):  # noqa: ANN001, ANN201
    _sent[asyncio.current_task()] = time.perf_counter()
    return await _send(self, conn)


erf.StreamedResponseHandler.add_chunk = add_chunk
client_reqrep.ClientRequest.send = send


async def run(port: int, c: int, n: int, trust_env: bool) -> dict:
    conn = aiohttp.TCPConnector(limit=c, limit_per_host=c, ttl_dns_cache=300, use_dns_cache=True,
                                keepalive_timeout=60, enable_cleanup_closed=True, force_close=False, ssl=False)
    rows: list[dict] = []
    async with aiohttp.ClientSession(connector=conn, trust_env=trust_env,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        sem = asyncio.Semaphore(c)

        async def one() -> None:
            async with sem:
                inp = erf.RequestFuncInput(prompt="hello world " * 40, prompt_len=81, output_len=64, model="standin",
                                           api_url=f"http://127.0.0.1:{port}/v1/completions", ignore_eos=True)
                out = await erf.async_request_openai_completions(inp, session)
                task = asyncio.current_task()
                t_read, ts = _first.pop(task)
                t_send = _sent.pop(task)
                rows.append({"ttft": out.ttft * 1e3, "pre": (t_send - out.start_time) * 1e3,
                             "wire": (ts - TTFT_S - t_send) * 1e3, "recv": (t_read - ts) * 1e3})

        await asyncio.gather(*(asyncio.create_task(one()) for _ in range(n)))
    return {k: {"mean": statistics.fmean(r[k] for r in rows), "p50": statistics.median(r[k] for r in rows)}
            for k in ("ttft", "pre", "wire", "recv")}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--main-python", default=os.path.join(ROOT, ".venv", "bin", "python"),
                   help="a Python with scalellm installed (runs the stand-in)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "vllm_bench_ttft_probe.json"))
    a = p.parse_args()
    proc = subprocess.Popen([a.main_python, "-m", "scalellm.bench.standin", "--port", "0", "--ttft-ms",
                             str(TTFT_S * 1e3), "--itl-ms", "20", "--stamp"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline().split()[1])
    results = []
    try:
        for trust_env in (True, False):
            for c, n in ((1, 8), (16, 64), (64, 256)):
                r = asyncio.run(run(port, c, n, trust_env))
                results.append({"trust_env": trust_env, "concurrency": c, "num_requests": n, **r})
                print(f"trust_env={trust_env!s:5s} c={c:3d}: TTFT mean {r['ttft']['mean']:6.1f} ms = pre "
                      f"{r['pre']['mean']:5.1f} + wire {r['wire']['mean']:4.1f} + 100 (programmed) + recv "
                      f"{r['recv']['mean']:4.1f}", flush=True)
    finally:
        proc.terminate()
    with open(a.out, "w") as f:
        json.dump({"programmed_ttft_ms": TTFT_S * 1e3, "aiohttp": aiohttp.__version__, "results": results}, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
