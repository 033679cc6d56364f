"""Start-up, memory and a first end-to-end load test of OpenAI servers, one after the
other on the same machine in one run: ScaleLLM (`scalellm serve`) and, when its
virtual environment exists, vLLM's CPU build (`python -m vllm.entrypoints.openai.api_server`).

Per server: seconds from launch to a working /v1/models, RSS of the whole process
tree when ready and after the load, then closed-loop load at each concurrency:
prompts of exactly --input-len token ids, --output-len tokens out (ignore_eos),
streaming completions; TTFT, inter-token latency, TPOT, e2e, throughput.

    python benchmarks/serve_compare.py --concurrency 1,16,64 --vllm-python /work/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

import httpx
import psutil


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def launch(cmd: list[str], url: str, timeout: float, env: dict | None = None) -> tuple[subprocess.Popen, float, str]:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {proc.stderr.read()[-3000:]}")
        try:
            r = httpx.get(f"{url}/v1/models", timeout=1)
            if r.status_code == 200:
                return proc, time.monotonic() - t0, r.json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(proc.pid, 9)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], out_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    n_out = usage["completion_tokens"] if usage else len(stamps)
    ttft = stamps[0] - t0 if stamps else float("nan")
    return {"ttft": ttft, "e2e": end - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "out": n_out,
            "tpot": (end - t0 - ttft) / (n_out - 1) if n_out > 1 else float("nan")}


async def load(url: str, model: str, concurrency: int, num: int, in_len: int, out_len: int, vocab: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(in_len)] for _ in range(num)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                p = queue.get_nowait()
                results.append(await one_request(client, url, model, p, out_len))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        dur = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    itl = [x for r in ok for x in r["itl"]]
    out_tokens = sum(r["out"] for r in ok)
    return {
        "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok), "duration_s": dur,
        "req_per_s": len(ok) / dur, "output_tok_per_s": out_tokens / dur,
        "ttft_mean_s": statistics.fmean(r["ttft"] for r in ok), "ttft_p99_s": pct([r["ttft"] for r in ok], 99),
        "tpot_mean_s": statistics.fmean(r["tpot"] for r in ok),
        "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "e2e_mean_s": statistics.fmean(r["e2e"] for r in ok), "e2e_p99_s": pct([r["e2e"] for r in ok], 99),
        "first_error": next((r["error"] for r in results if "error" in r), None),
    }


def bench_server(name: str, cmd: list[str], url: str, args: argparse.Namespace, env: dict | None = None) -> dict:
    proc, ready_s, model = launch(cmd, url, args.start_timeout, env)
    res: dict = {"name": name, "cmd": " ".join(cmd), "ready_s": ready_s, "rss_ready_mb": tree_rss(proc.pid) / 2**20}
    print(f"{name}: ready in {ready_s:.1f}s, RSS {res['rss_ready_mb']:.0f} MB", flush=True)
    try:
        asyncio.run(load(url, model, 2, 4, 16, 8, args.vocab, 0))  # warm-up
        res["runs"] = []
        for c in args.concurrency:
            num = max(args.min_requests, c * args.rounds)
            r = asyncio.run(load(url, model, c, num, args.input_len, args.output_len, args.vocab, args.seed))
            res["runs"].append(r)
            print(f"  c={c:3d} n={num:4d}: {r['req_per_s']:6.2f} req/s {r['output_tok_per_s']:7.1f} out tok/s | "
                  f"TTFT mean {r['ttft_mean_s'] * 1e3:7.0f} p99 {r['ttft_p99_s'] * 1e3:7.0f} ms | "
                  f"TPOT {r['tpot_mean_s'] * 1e3:6.1f} ms | ITL p99 {r['itl_p99_s'] * 1e3:6.0f} ms | "
                  f"e2e mean {r['e2e_mean_s']:6.2f} s | errors {r['errors']}", flush=True)
        res["rss_after_mb"] = tree_rss(proc.pid) / 2**20
    finally:
        stop(proc)
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="requests per concurrency slot")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--hf-dir", default="benchmarks/.cache/smollm2-hf-bf16", help="HF dir for vLLM (converted GGUF)")
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    p.add_argument("--only", default="scalellm,vllm")
    p.add_argument("--out", default="benchmarks/results/serve_compare.json")
    args = p.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    results = []
    only = args.only.split(",")
    if "scalellm" in only:
        cmd = [sys.executable, "-m", "scalellm.entrypoints.cli", "serve", "--port", "8101"]
        results.append(bench_server("scalellm", cmd, "http://127.0.0.1:8101", args))
    if "vllm" in only and os.path.exists(args.vllm_python):
        if not os.path.isfile(os.path.join(args.hf_dir, "model.safetensors")):
            subprocess.run([sys.executable, "-m", "scalellm.entrypoints.cli", "convert-gguf", args.hf_dir,
                            "--dtype", "bfloat16"], check=True)
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.hf_dir,
               "--served-model-name", "SmolLM2-135M-Instruct", "--port", "8102", "--max-model-len", "2048"]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
        results.append(bench_server("vllm", cmd, "http://127.0.0.1:8102", args, env))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": {k: v for k, v in vars(args).items()}, "machine": {"cpus": os.cpu_count()},
                   "results": results}, f, indent=2)
    if len(results) == 2 and results[0].get("runs") and results[1].get("runs"):
        for a, b in zip(results[0]["runs"], results[1]["runs"]):
            print(f"c={a['concurrency']}: throughput ratio scalellm/vllm x{a['output_tok_per_s'] / b['output_tok_per_s']:.2f}, "
                  f"mean e2e vllm/scalellm x{b['e2e_mean_s'] / a['e2e_mean_s']:.2f}")
        print(f"start-up: scalellm {results[0]['ready_s']:.1f}s vs vllm {results[1]['ready_s']:.1f}s; "
              f"RSS {results[0]['rss_ready_mb']:.0f} vs {results[1]['rss_ready_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
