"""Adaptive pools: where does a tensor-parallel replica stop beating plain replicas?

Issue 6 asks for the gateway's adaptive-pools crossover measured on this machine: a
low-latency pool (one replica with --tensor-parallel-size 2) against a throughput
pool (two replicas of one rank each), the default model, streaming completions.

The model: SmolLM2-135M itself cannot be split in two (9 attention heads, 3 KV heads), so
by default the run builds a random-weight Llama of the same size and shapes except
8 query heads / 4 KV heads of 72 (hidden 576, 30 layers, MLP 1536, vocab 49152, tied
embeddings, fp32) with SmolLM2's tokenizer (benchmarks/.cache/smollm2-135m-8heads; the
tokenizer comes from the HF copy of the default model that serve_compare.py makes).
The output is noise (ignore_eos keeps lengths exact); the cost per token is SmolLM2's.

Processes (all at once; the idle ones sleep while another is measured):
- replica L: `scalellm replica -tp 2` (2 ranks, threads_per_rank = cores / 2 each);
- replicas T1, T2: `scalellm replica` with OMP_NUM_THREADS = cores / 2 each;
- gateway gwL -> L; gateway gwT -> T1, T2 (least_load).
One `scalellm bench --url gwL --compare gwT` sweep over --concurrency, interleaved
(rounds L T T L), --duration seconds per load point and endpoint. The crossover is the
smallest concurrency where the throughput pool's mean e2e latency is below the latency
pool's; it becomes the adaptive policy's threshold. Then a third gateway gwA (policy
adaptive, both pools, that threshold) is swept alone over the same concurrencies and
compared with the better of L and T at each point.

    flock /work/cpu.lock python benchmarks/adaptive_pools.py        # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from scalellm.gateway.launcher import free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _serving import stop_all, wait_ready  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, "-m", "scalellm.entrypoints.cli"]


def build_model(path: str, hf_dir: str) -> str:
    """A random SmolLM2-135M-sized Llama with an even number of heads (see the docstring)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        subprocess.run([*CLI, "convert-gguf", hf_dir, "--dtype", "bfloat16"], check=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=72, vocab_size=49152, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, initializer_range=0.1)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copy(os.path.join(hf_dir, name), path)
    return path


def bench(args: list[str], out: str) -> dict:
    cmd = [*CLI, "bench", *args, "--no-progress", "--out", out]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.load(open(out))


def by_concurrency(doc: dict) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for run in doc["runs"]:
        s = run["summary"]
        out.setdefault(run["endpoint"], {})[int(run["point"]["value"])] = {
            "e2e_ms_mean": s["e2e_ms"]["mean"], "e2e_ms_p50": s["e2e_ms"]["p50"], "ttft_ms_p50": s["ttft_ms"]["p50"],
            "tpot_ms_p50": s["tpot_ms"]["p50"], "output_tok_s": s["output_token_throughput"],
            "requests": s["num_ok"], "errors": s["num_errors"]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per load point and endpoint")
    p.add_argument("--requests-per-slot", type=int, default=0,
                   help="instead of --duration: concurrency x this many requests per load point and endpoint "
                        "(whole waves; a duration shorter than a few e2e latencies cuts waves at the edges)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model", default=None, help="HF dir or GGUF (default: the 8-head SmolLM2-sized model, built)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "adaptive_pools.json"))
    a = p.parse_args()
    model = a.model or build_model(os.path.join(HERE, ".cache", "smollm2-135m-8heads"),
                                   os.path.join(HERE, ".cache", "smollm2-hf-bf16"))
    cores = len(os.sched_getaffinity(0))
    procs: list[subprocess.Popen] = []
    tmp = tempfile.mkdtemp(prefix="adaptive_pools_")
    result: dict = {"config": vars(a), "machine": {"cores": cores, "start_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                              time.gmtime())}}

    def spawn(args: list[str], env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
        procs.append(proc)
        return proc

    try:
        replicas: dict[str, str] = {}
        ready: dict[str, float] = {}
        specs = {"L": (["-tp", "2"], None),
                 "T1": ([], {"OMP_NUM_THREADS": str(max(1, cores // 2))}),
                 "T2": ([], {"OMP_NUM_THREADS": str(max(1, cores // 2))})}
        for name, (extra, env) in specs.items():  # one at a time: start-up is CPU-bound
            http, grpc_port = free_port(), free_port()
            proc = spawn(["replica", "--model", model, "--port", str(http), "--grpc-port", str(grpc_port), *extra],
                         env)
            ready[name] = wait_ready(proc, f"http://127.0.0.1:{http}", f"replica {name}")
            replicas[name] = f"127.0.0.1:{grpc_port}"
        gw = {}
        for name, members in (("gwL", ["L"]), ("gwT", ["T1", "T2"])):
            port = free_port()
            proc = spawn(["gateway", "--port", str(port), "--policy", "least_load",
                          *[x for m in members for x in ("--replica", replicas[m])]])
            gw[name] = f"http://127.0.0.1:{port}"
            wait_ready(proc, gw[name], name)
        time.sleep(3)  # every replica probed healthy
        result["ready_s"] = ready
        common = ["--input-len", str(a.input_len), "--output-len", str(a.output_len), "--warmup", str(a.warmup)]
        levels_arg = [int(c) for c in a.concurrency.split(",")]

        def sweep(args: list[str], out: str) -> dict[str, dict[int, dict]]:
            if not a.requests_per_slot:
                return by_concurrency(bench([*args, *common, "--concurrency", a.concurrency,
                                             "--duration", str(a.duration)], out))
            merged: dict[str, dict[int, dict]] = {}
            for c in levels_arg:  # one bench run per level: --num-requests is one number per run
                part = by_concurrency(bench([*args, *common, "--concurrency", str(c), "--num-requests",
                                             str(c * a.requests_per_slot)], out.replace(".json", f"_c{c}.json")))
                for ep, pts in part.items():
                    merged.setdefault(ep, {}).update(pts)
            return merged

        lt = sweep(["--url", gw["gwL"], "--compare", gw["gwT"], "--label", "latency_pool_tp2",
                    "--label2", "throughput_pool_2x1", "--rounds", str(a.rounds)],
                   a.out.replace(".json", "_LT_bench.json"))
        L, T = lt["latency_pool_tp2"], lt["throughput_pool_2x1"]
        levels = sorted(L)
        crossover = next((c for c in levels if T[c]["e2e_ms_mean"] < L[c]["e2e_ms_mean"]), None)
        result["latency_pool_tp2"], result["throughput_pool_2x1"] = L, T
        result["crossover_concurrency"] = crossover
        print(f"crossover: {crossover}", flush=True)

        threshold = crossover or max(levels) * 2
        cfg = os.path.join(tmp, "adaptive.toml")
        with open(cfg, "w") as f:
            f.write(f'policy = "adaptive"\n[policy_options]\nthreshold = {threshold}\n'
                    'latency_pool = "latency"\nthroughput_pool = "throughput"\n')
            for name, pool in (("L", "latency"), ("T1", "throughput"), ("T2", "throughput")):
                f.write(f'[[replicas]]\naddress = "{replicas[name]}"\npool = "{pool}"\n')
        port = free_port()
        proc = spawn(["gateway", "--port", str(port), "--config", cfg])
        gw["gwA"] = f"http://127.0.0.1:{port}"
        wait_ready(proc, gw["gwA"], "gwA")
        time.sleep(3)
        A = next(iter(sweep(["--url", gw["gwA"], "--label", f"adaptive_threshold_{threshold}"],
                            a.out.replace(".json", "_A_bench.json")).values()))
        result["adaptive"] = {"threshold": threshold, "points": A}
        result["adaptive_vs_best"] = {
            c: {"adaptive_e2e_ms": A[c]["e2e_ms_mean"],
                "best_pool": "latency" if L[c]["e2e_ms_mean"] <= T[c]["e2e_ms_mean"] else "throughput",
                "best_e2e_ms": min(L[c]["e2e_ms_mean"], T[c]["e2e_ms_mean"]),
                "adaptive_over_best": A[c]["e2e_ms_mean"] / min(L[c]["e2e_ms_mean"], T[c]["e2e_ms_mean"])}
            for c in levels if c in A}
    finally:
        stop_all(procs[::-1])
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'c':>4s} {'L e2e ms':>10s} {'T e2e ms':>10s} {'A e2e ms':>10s} {'L tok/s':>9s} {'T tok/s':>9s} "
          f"{'A tok/s':>9s}")
    for c in levels:
        av = result["adaptive"]["points"].get(c, {})
        print(f"{c:4d} {L[c]['e2e_ms_mean']:10.0f} {T[c]['e2e_ms_mean']:10.0f} {av.get('e2e_ms_mean', float('nan')):10.0f}"
              f" {L[c]['output_tok_s']:9.1f} {T[c]['output_tok_s']:9.1f} {av.get('output_tok_s', float('nan')):9.1f}")
    print(f"crossover concurrency: {result['crossover_concurrency']}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
