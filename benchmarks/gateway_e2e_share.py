"""The gateway's share of end-to-end latency with the real default model.

Two servers side by side (the idle one waits while the other is measured):
`scalellm serve` (gateway + 1 replica, the replica behind gRPC) and
`scalellm serve --no-gateway` (the same replica answering HTTP itself). Then one
`scalellm bench` run, A/B interleaved (`--compare`, rounds A B B A), closed loop at
--concurrency, --input-len prompt tokens, --output-len output tokens (ignore_eos),
streaming. Reported:

- in-band: the gateway's own `usage.timings.overhead` per request (its e2e minus the
  replica's received -> finished), over that request's e2e as the client saw it;
- A/B: e2e through the gateway vs directly at the replica (noisier: two different
  runs of a busy engine).

    flock /work/cpu.lock python benchmarks/gateway_e2e_share.py      # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import psutil

from scalellm.bench.stats import distribution
from scalellm.gateway.launcher import free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _serving import stop_all, wait_ready  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def start(args: list[str], port: int, timeout: float = 300) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen([sys.executable, "-m", "scalellm.entrypoints.cli", "serve", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_ready(proc, f"http://127.0.0.1:{port}", f"scalellm serve {args}", timeout)


def tree_cpu(proc: subprocess.Popen) -> dict[str, float]:
    """CPU seconds (user + system) of a server's process tree by depth: `depth0` is the
    top process of `serve` (the gateway; with --no-gateway the replica's frontend),
    `depth1`, `depth2` its children and grandchildren (replica frontend, engine core)."""
    top = psutil.Process(proc.pid)
    out: dict[str, float] = {}
    for p in [top, *top.children(recursive=True)]:
        try:
            t = p.cpu_times()
            depth, q = 0, p
            while q.pid != top.pid:
                q = q.parent()
                depth += 1
        except (psutil.NoSuchProcess, AttributeError):
            continue
        key = f"depth{depth}"
        out[key] = out.get(key, 0.0) + t.user + t.system
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=256, help="per endpoint, split over the rounds")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "gateway_e2e_share.json"))
    a = p.parse_args()
    gw_port, direct_port = free_port(), free_port()
    procs = []
    try:
        gw, gw_ready = start([], gw_port)
        procs.append(gw)
        direct, direct_ready = start(["--no-gateway"], direct_port)
        procs.append(direct)
        print(f"ready: gateway+replica {gw_ready:.1f} s, bare replica {direct_ready:.1f} s", flush=True)
        bench_out = a.out.replace(".json", "_bench.json")
        cmd = [sys.executable, "-m", "scalellm.entrypoints.cli", "bench", "--url", f"http://127.0.0.1:{gw_port}",
               "--compare", f"http://127.0.0.1:{direct_port}", "--label", "gateway", "--label2", "direct",
               "--concurrency", str(a.concurrency), "--input-len", str(a.input_len), "--output-len", str(a.output_len),
               "--num-requests", str(a.num_requests), "--rounds", str(a.rounds), "--no-progress", "--out", bench_out]
        print(" ".join(cmd[2:]), flush=True)
        cpu0 = {"gateway_side": tree_cpu(gw), "direct_side": tree_cpu(direct)}
        subprocess.run(cmd, check=True)
        cpu1 = {"gateway_side": tree_cpu(gw), "direct_side": tree_cpu(direct)}
    finally:
        stop_all(procs)

    doc = json.load(open(bench_out))
    runs = {r["endpoint"]: r for r in doc["runs"]}
    gwr = runs["gateway"]
    shares, overheads = [], []
    for rec in gwr["records"]:
        st = rec["server_timings_ms"]
        if rec["is_ok"] and "overhead" in st and rec["end_s"] is not None and rec["sent_s"] is not None:
            e2e = (rec["end_s"] - rec["sent_s"]) * 1e3
            overheads.append(st["overhead"])
            shares.append(100 * st["overhead"] / e2e)
    g, d = gwr["summary"], runs["direct"]["summary"]
    out = {
        "config": vars(a),
        "bench_result": os.path.relpath(bench_out, HERE),
        "gateway_overhead_ms": distribution(overheads),
        "gateway_share_percent": distribution(shares),
        "gateway_share_of_mean_e2e_percent": 100 * distribution(overheads)["mean"] / g["e2e_ms"]["mean"],
        "breakdown_ms_gateway": g.get("breakdown_ms"),
        "e2e_ms": {"gateway": g["e2e_ms"], "direct": d["e2e_ms"]},
        "ttft_ms": {"gateway": g["ttft_ms"], "direct": d["ttft_ms"]},
        "output_token_throughput": {"gateway": g["output_token_throughput"], "direct": d["output_token_throughput"]},
        "ab_e2e_mean_diff_percent": 100 * (g["e2e_ms"]["mean"] - d["e2e_ms"]["mean"]) / d["e2e_ms"]["mean"],
        "ab_e2e_p50_diff_percent": 100 * (g["e2e_ms"]["p50"] - d["e2e_ms"]["p50"]) / d["e2e_ms"]["p50"],
        "num_errors": {"gateway": g["num_errors"], "direct": d["num_errors"]},
        # whole run (each side idles while the other is measured), by depth in the process tree
        "cpu_s": {side: {k: cpu1[side].get(k, 0.0) - cpu0[side].get(k, 0.0) for k in cpu1[side]} for side in cpu1},
        "output_tokens": {"gateway": g["total_output_tokens"], "direct": d["total_output_tokens"]},
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    ov, sh = out["gateway_overhead_ms"], out["gateway_share_percent"]
    print(f"gateway overhead per request: mean {ov['mean']:.2f} ms, p50 {ov['p50']:.2f}, p99 {ov['p99']:.2f} ms; "
          f"share of e2e: mean {sh['mean']:.3f}%, p50 {sh['p50']:.3f}%, p99 {sh['p99']:.3f}%; "
          f"A/B e2e mean {out['ab_e2e_mean_diff_percent']:+.1f}% (p50 {out['ab_e2e_p50_diff_percent']:+.1f}%)")
    for side, cpu in out["cpu_s"].items():
        print(f"CPU {side}: " + ", ".join(f"{k} {v:.1f} s" for k, v in cpu.items()))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
