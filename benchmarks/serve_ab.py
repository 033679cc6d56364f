"""Served A/B: `scalellm serve` variants (environment and/or flags), each started alone and
measured with `scalellm bench` (closed loop, 128 in / 128 out, ignore_eos), alternated round by
round (A B, A B, ...), so that the VM's drift hits every variant alike.

    python benchmarks/serve_ab.py --variant "amx=" --variant "torch=SCALELLM_NO_AMX_ATTENTION=1" \\
        --rounds 3 --out benchmarks/results/amx_attention_serve_ab.json

A variant is NAME=[ENV=VALUE ...] [-- FLAGS]: e.g. "int8=-- --quantization int8".
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from _serving import stop_all, wait_ready

KEYS = (("output_token_throughput", None), ("ttft_ms", "p50"), ("ttft_ms", "p99"), ("itl_ms", "p99"),
        ("tpot_ms", "mean"), ("e2e_ms", "mean"))


def parse_variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    name, _, rest = text.partition("=")
    env_part, _, flags = rest.partition("--")
    env = dict(kv.split("=", 1) for kv in shlex.split(env_part))
    return name, env, shlex.split(flags)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--idle", type=float, default=10.0, help="seconds between /ready and the run")
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--out", default="")
    a = p.parse_args()
    variants = [parse_variant(v) for v in a.variant]
    results: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, env, flags in variants:
                url = f"http://127.0.0.1:{a.port}"
                proc = subprocess.Popen([sys.executable, "-m", "scalellm.entrypoints.cli", "serve", "--port",
                                         str(a.port), *flags], env={**os.environ, **env},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    wait_ready(proc, url, name)
                    time.sleep(a.idle)
                    out = os.path.join(tmp, f"{name}_{r}.json")
                    subprocess.run([sys.executable, "-m", "scalellm.entrypoints.cli", "bench", "--url", url,
                                    "--concurrency", str(a.concurrency), "--num-requests", str(a.num_requests),
                                    "--input-len", "128", "--output-len", "128", "--warmup", "2", "--settle", "3",
                                    "--no-progress", "--out", out], check=True, stdout=subprocess.DEVNULL)
                finally:
                    stop_all([proc])
                with open(out) as f:
                    s = json.load(f)["runs"][0]["summary"]
                row = {f"{k}.{q}" if q else k: (s[k][q] if q else s[k]) for k, q in KEYS}
                results[name].append(row)
                print(name, r, {k: round(v, 1) for k, v in row.items()}, flush=True)
    medians = {name: {k: statistics.median(row[k] for row in rows) for k in rows[0]} for name, rows in results.items()}
    for name, m in medians.items():
        print(f"{name:12s} median", {k: round(v, 1) for k, v in m.items()})
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": vars(a), "rounds": results, "median": medians}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
