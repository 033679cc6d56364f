"""A burst sent the moment `scalellm serve` answers /ready, with the warm-up step's idle grace
period off (SCALELLM_WARM_UP_GRACE_S=0, the warm-up step at once: the behaviour before session
16) and on (the default, 1 s), alternated round by round.

    python benchmarks/burst_at_ready.py --rounds 2 --out benchmarks/results/burst_at_ready.json

Each run: a fresh server, `scalellm bench` at once (no warm-up requests, no settle time),
--concurrency requests of 128 prompt tokens and --output-len tokens out. Prints TTFT p50/p99
and mean e2e per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

from _serving import stop_all, wait_ready

VARIANTS = {"warm-up at once": "0", "grace 1 s": "1.0"}


def one_run(port: int, grace: str, concurrency: int, output_len: int) -> dict[str, float]:
    env = dict(os.environ, SCALELLM_WARM_UP_GRACE_S=grace)
    srv = subprocess.Popen(["scalellm", "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_ready(srv, f"http://127.0.0.1:{port}", interval=0.05)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "bench.json")
            subprocess.run(["scalellm", "bench", "--url", f"http://127.0.0.1:{port}", "--model", "SmolLM2-135M-Instruct",
                            "--concurrency", str(concurrency), "--num-requests", str(concurrency), "--input-len", "128",
                            "--output-len", str(output_len), "--warmup", "0", "--settle", "0", "--out", out,
                            "--no-progress"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(out) as f:
                s = json.load(f)["runs"][0]["summary"]
    finally:
        stop_all([srv])
    return {"ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p99_ms": s["ttft_ms"]["p99"], "e2e_mean_ms": s["e2e_ms"]["mean"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--port", type=int, default=8500)
    p.add_argument("--out", default="")
    a = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for r in range(a.rounds):
        for name, grace in VARIANTS.items():
            res = one_run(a.port + r, grace, a.concurrency, a.output_len)
            runs[name].append(res)
            print(f"{name:16s} round {r}: TTFT p50 / p99 {res['ttft_p50_ms']:.0f} / {res['ttft_p99_ms']:.0f} ms, "
                  f"mean e2e {res['e2e_mean_ms']:.0f} ms", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": vars(a), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
