"""Where the gateway's CPU per streamed request goes, part by part (the account behind
benchmarks/router_compare.py). Each part is timed alone, CPU seconds per request of
--output-len one-token chunks (min and median of --repeats runs):

- app: the shared OpenAI app + GatewayBackend + ReplicaClient + proto conversion, with a
  fake gRPC stub that hands over prebuilt GenerateResponses and an ASGI `send` that
  drops the bytes: our own Python per request, no network.
- grpc_client: a grpc.aio client streaming the same messages from the instant gRPC
  stand-in (benchmarks/gateway_overhead.py, its own process), closed loop at
  --concurrency: what the gRPC hop costs the gateway's process.
- uvicorn_sse: uvicorn (httptools, uvloop, as the gateway runs it) serving a bare ASGI
  app that writes the same SSE bytes in 17 sends back to back, driven by the bench
  client at --concurrency: the HTTP server and its socket writes.

    flock /work/cpu.lock python benchmarks/gateway_cost_parts.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import grpc
import psutil
import uvloop

from scalellm.api.app import OpenAIApp
from scalellm.gateway.backend import GatewayBackend
from scalellm.gateway.launcher import free_port
from scalellm.gateway.replica_client import ReplicaClient
from scalellm.gateway.routing import LeastLoad
from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.grpc import replica_pb2_grpc as pb_grpc

HERE = os.path.dirname(os.path.abspath(__file__))


def responses(n: int) -> list[pb.GenerateResponse]:
    """What the instant stand-in sends for one request (benchmarks/gateway_overhead.py)."""
    out, t = [], time.time()
    for i in range(n):
        last = i == n - 1
        r = pb.GenerateResponse(
            choices=[pb.Choice(index=0, text=" x", token_ids=[87], finish_reason="length" if last else "")],
            prompt_tokens=4, completion_tokens=i + 1, finished=last, prompt_text="fake" if i == 0 else None,
            prompt_token_ids=[1, 2, 3, 4] if i == 0 else [])
        if last:
            r.timestamps.CopyFrom(pb.Timestamps(received=t, finished=t + 1e-3))
        out.append(r)
    return out


class _FakeCall:
    def __init__(self, msgs: list[pb.GenerateResponse]) -> None:
        self.msgs, self._done = msgs, False

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self._gen()

    async def _gen(self):  # type: ignore[no-untyped-def]
        for m in self.msgs:
            yield m
        self._done = True

    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        self._done = True


class _FakeStub:
    def __init__(self, msgs: list[pb.GenerateResponse]) -> None:
        self.msgs = msgs

    def Generate(self, request, **kwargs):  # type: ignore[no-untyped-def]  # noqa: N802 - gRPC stub name
        return _FakeCall(self.msgs)


async def app_part(n_tokens: int, num: int) -> float:
    replica = ReplicaClient("127.0.0.1:1")
    replica.stub, replica.connected, replica.models = _FakeStub(responses(n_tokens)), True, ["fake"]
    app = OpenAIApp(GatewayBackend([replica], LeastLoad()))
    body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hello world"}],
                       "max_tokens": n_tokens, "stream": True, "stream_options": {"include_usage": True},
                       "ignore_eos": True}).encode()
    never = asyncio.get_running_loop().create_future()

    async def one() -> None:
        inbox = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if inbox:
                return inbox.pop()
            return await never

        async def send(message: dict) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        await app(scope, receive, send)

    for _ in range(200):
        await one()
    c0 = time.process_time()
    for _ in range(num):
        await one()
    return (time.process_time() - c0) / num


async def grpc_part(port: int, n_tokens: int, num: int, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.ReplicaStub(ch)
        req = pb.GenerateRequest(prompt="hello world", params=pb.SamplingParams(max_tokens=n_tokens))

        async def one() -> None:
            async for _ in stub.Generate(req):
                pass

        for _ in range(100):
            await one()
        left = [num]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                await one()

        c0 = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (time.process_time() - c0) / num


UVICORN_APP = """
import sys, uvicorn
N = int(sys.argv[2])
CH = (b'data: {"id":"chatcmpl-0123456789abcdef0123456789abcdef","object":"chat.completion.chunk","created":1,'
      b'"model":"fake","choices":[{"index":0,"delta":{"content":" x"},"logprobs":null,"finish_reason":null}],'
      b'"usage":null}\\n\\n')
END = (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"fake","choices":[],'
       b'"usage":{"prompt_tokens":4,"completion_tokens":16,"total_tokens":20}}\\n\\ndata: [DONE]\\n\\n')
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(N - 1):
        await send({"type": "http.response.body", "body": CH, "more_body": True})
    await send({"type": "http.response.body", "body": CH + END, "more_body": False})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools", log_level="warning",
            access_log=False)
"""


async def uvicorn_part(port: int, proc: psutil.Process, n_tokens: int, concurrency: int, duration: float) -> float:
    from scalellm.bench.endpoint import Endpoint, EndpointConfig
    from scalellm.bench.records import BenchRequest
    from scalellm.bench.runner import LoadPoint, Runner

    ep = Endpoint(EndpointConfig(url=f"http://127.0.0.1:{port}", model="fake", api="chat"))
    try:
        await ep.prepare()
        reqs = [BenchRequest(i, "hello world", None, -1, n_tokens) for i in range(512)]
        t0 = proc.cpu_times()
        res = (await Runner([ep], reqs, num_warmup=concurrency).run(
            [LoadPoint(concurrency=concurrency, duration=duration)]))[0]
        t1 = proc.cpu_times()
    finally:
        ep.close()
    return (t1.user + t1.system - t0.user - t0.system) / (len(res.records) + concurrency + 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "results", "gateway_cost_parts.json"))
    a = p.parse_args()
    samples: dict[str, list[float]] = {"app": [], "grpc_client": [], "uvicorn_sse": []}
    gport, uport = free_port(), free_port()
    standin = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); "
                                f"from gateway_overhead import run_standin; run_standin({gport})"])
    server = subprocess.Popen([sys.executable, "-c", UVICORN_APP, str(uport), str(a.output_len)])
    try:
        time.sleep(3)
        for r in range(a.repeats):
            samples["app"].append(uvloop.run(app_part(a.output_len, 2000)))
            samples["grpc_client"].append(uvloop.run(grpc_part(gport, a.output_len, 2000, a.concurrency)))
            samples["uvicorn_sse"].append(uvloop.run(uvicorn_part(uport, psutil.Process(server.pid), a.output_len,
                                                                  a.concurrency, 2.0)))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.3f} ms" for k, v in samples.items()), flush=True)
    finally:
        standin.kill()
        server.kill()
    out = {"config": vars(a), "cpu_ms_per_request": {
        k: {"min": min(v) * 1e3, "median": statistics.median(v) * 1e3, "all": [x * 1e3 for x in v]}
        for k, v in samples.items()}}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    for k, v in out["cpu_ms_per_request"].items():
        print(f"{k:12s} min {v['min']:.3f} ms, median {v['median']:.3f} ms CPU per request")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
