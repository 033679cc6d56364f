"""Gateway overhead against a replica stand-in that answers instantly (fake tokens).

Three processes: the stand-in gRPC Replica (yields --output-len one-token chunks with
no model), `scalellm gateway` in front of it, and this load generator (httpx, closed
loop). Reported per concurrency: requests/s and latency percentiles through the
gateway, and the same calls made directly to the stand-in over gRPC, so the
difference is what the gateway (HTTP parse, routing, gRPC hop, SSE) adds.

    python benchmarks/gateway_overhead.py --concurrency 1,16,64 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import grpc
import httpx

from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.grpc import replica_pb2_grpc as pb_grpc


class InstantReplica(pb_grpc.ReplicaServicer):
    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        n = request.params.max_tokens or 16
        received = time.time()
        for i in range(n):
            last = i == n - 1
            resp = pb.GenerateResponse(
                choices=[pb.Choice(index=0, text=" x", token_ids=[87], finish_reason="length" if last else "")],
                prompt_tokens=4, completion_tokens=i + 1, finished=last,
                prompt_text="fake" if i == 0 else None, prompt_token_ids=[1, 2, 3, 4] if i == 0 else [])
            if last:  # received/finished let the gateway report its own overhead (usage.timings)
                resp.timestamps.CopyFrom(pb.Timestamps(received=received, finished=time.time()))
            yield resp

    async def Health(self, request, context):  # type: ignore[no-untyped-def]
        return pb.HealthResponse(live=True, ready=True)

    async def Load(self, request, context):  # type: ignore[no-untyped-def]
        return pb.LoadResponse(kv_blocks_total=1000)

    async def StreamLoad(self, request, context):  # type: ignore[no-untyped-def]
        while True:
            yield pb.LoadResponse(kv_blocks_total=1000)
            await asyncio.sleep(max(request.interval_ms, 10) / 1000)

    async def Models(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ModelsResponse(models=["fake"], max_model_len=4096)


def run_standin(port: int) -> None:
    import uvloop

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_ReplicaServicer_to_server(InstantReplica(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def via_gateway(url: str, concurrency: int, total: int, out_len: int, stream: bool) -> list[float]:
    lat: list[float] = []
    body = {"model": "fake", "prompt": "hello", "max_tokens": out_len, "stream": stream}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        left = [total]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                t0 = time.perf_counter()
                if stream:
                    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                        async for _ in r.aiter_lines():
                            pass
                else:
                    r = await client.post(f"{url}/v1/completions", json=body)
                    r.raise_for_status()
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return lat


async def via_gateway_raw(url: str, concurrency: int, total: int, out_len: int, stream: bool) -> list[float]:
    """The same calls over raw keep-alive sockets with a pre-encoded request: a load
    generator that costs far less CPU per request than httpx."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "fake", "prompt": "hello", "max_tokens": out_len, "stream": stream}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    lat: list[float] = []
    left = [total]

    async def read_response(reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:100])
        lower = head.lower()
        if b"content-length:" in lower:
            n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(n)
        else:  # chunked
            await reader.readuntil(b"\r\n0\r\n\r\n")

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while left[0] > 0:
                left[0] -= 1
                t0 = time.perf_counter()
                writer.write(request)
                await read_response(reader)
                lat.append(time.perf_counter() - t0)
        finally:
            writer.close()

    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return lat


async def direct(port: int, concurrency: int, total: int, out_len: int) -> list[float]:
    lat: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.ReplicaStub(ch)
        left = [total]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                t0 = time.perf_counter()
                async for _ in stub.Generate(pb.GenerateRequest(prompt="hello", params=pb.SamplingParams(max_tokens=out_len))):
                    pass
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return lat


def summary(lat: list[float], wall: float) -> dict:
    return {"n": len(lat), "req_per_s": len(lat) / wall, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/gateway_overhead.json")
    a = p.parse_args()
    from scalellm.gateway.launcher import free_port

    rp, gp = free_port(), free_port()
    standin = mp.get_context("spawn").Process(target=run_standin, args=(rp,), daemon=True)
    standin.start()
    gw = subprocess.Popen([sys.executable, "-m", "scalellm.entrypoints.cli", "gateway", "--replica", f"127.0.0.1:{rp}",
                           "--port", str(gp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{gp}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        rows = []
        for c in map(int, a.concurrency.split(",")):
            asyncio.run(via_gateway(url, c, 50, a.output_len, True))  # warm-up
            res = {"concurrency": c}
            for name, fn in (("gateway_stream", lambda: via_gateway(url, c, a.requests, a.output_len, True)),
                             ("gateway_json", lambda: via_gateway(url, c, a.requests, a.output_len, False)),
                             ("gateway_stream_raw", lambda: via_gateway_raw(url, c, a.requests, a.output_len, True)),
                             ("direct_grpc", lambda: direct(rp, c, a.requests, a.output_len))):
                t0 = time.perf_counter()
                lat = asyncio.run(fn())
                res[name] = summary(lat, time.perf_counter() - t0)
            rows.append(res)
            g, d, raw = res["gateway_stream"], res["direct_grpc"], res["gateway_stream_raw"]
            print(f"c={c:3d}: gateway(stream, httpx) {g['req_per_s']:6.0f} req/s p50 {g['p50_ms']:6.2f} ms | "
                  f"gateway(stream, raw client) {raw['req_per_s']:6.0f} req/s p50 {raw['p50_ms']:6.2f} "
                  f"p99 {raw['p99_ms']:6.2f} ms | "
                  f"direct gRPC {d['req_per_s']:7.0f} req/s p50 {d['p50_ms']:6.2f} p99 {d['p99_ms']:6.2f} ms | "
                  f"added p50 (raw) {raw['p50_ms'] - d['p50_ms']:5.2f} ms", flush=True)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"config": vars(a), "rows": rows}, f, indent=2)
    finally:
        gw.terminate()
        gw.wait(30)
        standin.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
