"""Where the time goes when serving at concurrency 64 (issue 7: split into forward,
sampling, scheduling, IPC, gRPC, HTTP, tokenization/detokenization; the serving
overhead — everything but forward + sampling — under 10% of wall time).

The same topology as `scalellm serve`, started piecewise so each process can be
measured: `scalellm replica` (engine-core process + frontend, gRPC, plus HTTP for its
/metrics) and `scalellm gateway --replica` in front of it. One `scalellm bench` run
through the gateway (closed loop, --concurrency, --input-len / --output-len, ignore_eos,
streaming). Measured over the run:
- the engine-core process's wall time by phase, from the replica's
  `scalellm_engine_phase_seconds_total` (schedule, prepare, forward, sample, update,
  ipc, idle; see protocol.ipc.CORE_PHASES);
- CPU seconds of each process (psutil): engine core, replica frontend (tokenize,
  detokenize, stop strings, ZMQ IPC, gRPC server), gateway (HTTP, JSON, SSE, gRPC
  client), and the bench client.
The overhead share is (engine-core wall time outside forward + sample and idle) over
the run's wall time; the frontend's and gateway's CPU is reported beside it as a share
of the machine's CPU (cores x wall), since on 2 cores it competes with the forward.

    flock /work/cpu.lock python benchmarks/serve_profile.py                      # ~3 min
    flock /work/cpu.lock python benchmarks/serve_profile.py --serve-args "--quantization int8"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request

import psutil
from prometheus_client.parser import text_string_to_metric_families

from scalellm.gateway.launcher import free_port

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _serving import wait_ready  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, "-m", "scalellm.entrypoints.cli"]


def phases(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    for fam in text_string_to_metric_families(text):
        if fam.name == "scalellm_engine_phase_seconds":
            return {s.labels["phase"]: s.value for s in fam.samples if s.name.endswith("_total")}
    raise RuntimeError("no scalellm_engine_phase_seconds on the replica")


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--serve-args", default="")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds to wait after ready, before measuring: the engine's idle work (its warm-up step, "
                        "the KV prefault) runs first, as on a server that has been up a while")
    p.add_argument("--out", default=os.path.join(HERE, "results", "serve_profile.json"))
    a = p.parse_args()
    http, grpc_port, gw_port = free_port(), free_port(), free_port()
    replica = subprocess.Popen([*CLI, "replica", "--port", str(http), "--grpc-port", str(grpc_port),
                                *shlex.split(a.serve_args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gateway = None
    try:
        rurl = f"http://127.0.0.1:{http}"
        wait_ready(replica, rurl)
        gateway = subprocess.Popen([*CLI, "gateway", "--port", str(gw_port), "--replica", f"127.0.0.1:{grpc_port}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gurl = f"http://127.0.0.1:{gw_port}"
        wait_ready(gateway, gurl)
        time.sleep(a.settle)
        front = psutil.Process(replica.pid)
        core = next(c for c in front.children(recursive=True) if "core_process" in " ".join(c.cmdline() or []))
        gw = psutil.Process(gateway.pid)
        out_json = a.out.replace(".json", "_bench.json")
        cmd = [*CLI, "bench", "--url", gurl, "--concurrency", str(a.concurrency), "--num-requests",
               str(a.num_requests), "--input-len", str(a.input_len), "--output-len", str(a.output_len),
               "--warmup", "4", "--no-progress", "--out", out_json]
        # NOTE: phases and CPU are read around the whole bench run, warm-up included; the
        # bench's own CPU is its process's (a child of this one).
        ph0, cpu0 = phases(rurl), {"core": cpu(core), "frontend": cpu(front), "gateway": cpu(gw)}
        children0 = os.times()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        children1 = os.times()
        ph1, cpu1 = phases(rurl), {"core": cpu(core), "frontend": cpu(front), "gateway": cpu(gw)}
    finally:
        for proc in (gateway, replica):
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    bench = json.load(open(out_json))["runs"][0]["summary"]
    core_phases = {k: ph1[k] - ph0[k] for k in ph1}
    # NOTE: the replica learns the core's phase clock from the load report each step's outputs
    # carry, so the idle seconds of the settle (or any idle spell) reach it with the next step,
    # inside the measured window: idle is taken as the wall time the other phases leave
    core_phases["idle"] = max(0.0, wall - sum(v for k, v in core_phases.items() if k != "idle"))
    cpu_s = {k: cpu1[k] - cpu0[k] for k in cpu1}
    cpu_s["bench_client"] = (children1.children_user + children1.children_system
                             - children0.children_user - children0.children_system)
    cores = len(os.sched_getaffinity(0))
    model_s = core_phases["forward"] + core_phases["sample"]
    overhead_s = sum(v for k, v in core_phases.items() if k not in ("forward", "sample", "idle"))
    result = {
        "config": vars(a), "machine": {"cores": cores, "start_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "wall_s": wall,
        "core_phase_seconds": core_phases,
        "core_phase_share_of_wall": {k: v / wall for k, v in core_phases.items()},
        "core_unaccounted_s": wall - sum(core_phases.values()),
        "model_share_of_wall": model_s / wall,
        "core_overhead_share_of_wall": overhead_s / wall,
        "cpu_seconds": cpu_s,
        "cpu_share_of_machine": {k: v / (cores * wall) for k, v in cpu_s.items()},
        "serving_cpu_outside_core_share_of_machine": (cpu_s["frontend"] + cpu_s["gateway"]) / (cores * wall),
        "bench_summary": {k: bench[k] for k in ("num_ok", "num_errors", "output_token_throughput", "duration_s")},
        "bench_ms": {k: bench[k] for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")},
        "breakdown_ms": bench.get("breakdown_ms"),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wall {wall:.1f} s, {bench['num_ok']} requests, {bench['output_token_throughput']:.1f} out tok/s")
    print("engine core, share of wall: " + ", ".join(f"{k} {100 * v / wall:.1f}%" for k, v in core_phases.items())
          + f", unaccounted {100 * result['core_unaccounted_s'] / wall:.1f}%")
    print(f"  model (forward + sample) {100 * result['model_share_of_wall']:.1f}%, core overhead (schedule + prepare"
          f" + update + ipc) {100 * result['core_overhead_share_of_wall']:.1f}%")
    print("CPU seconds: " + ", ".join(f"{k} {v:.1f} ({100 * v / (cores * wall):.1f}% of {cores} cores)"
                                      for k, v in cpu_s.items()))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
