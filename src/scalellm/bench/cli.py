"""`scalellm bench`: flags, and the glue that runs one benchmark from them.

Importing this module is cheap (argparse only); the bench itself is imported when
the command runs. Environment: OPENAI_API_KEY is the default for --api-key (read
here and nowhere else).

What this module does NOT know: how anything is measured; it wires the parts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("endpoint")
    e.add_argument("--url", required=True, help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    e.add_argument("--model", default=None, help="model name (default: the first one the server lists)")
    e.add_argument("--api", choices=["completions", "chat"], default="completions",
                   help="/v1/completions or /v1/chat/completions")
    e.add_argument("--no-stream", action="store_true", help="non-streaming requests (no TTFT/ITL)")
    e.add_argument("--api-key", default=None, help="Bearer key (default: $OPENAI_API_KEY)")
    e.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'", help="extra header (repeat)")
    e.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    e.add_argument("--temperature", type=float, default=None, help="sent when given (default: server's)")
    e.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos (it is sent by default and dropped if the server refuses it)")
    e.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    c = p.add_argument_group("comparison")
    c.add_argument("--compare", default=None, metavar="URL2", help="second endpoint, measured in the same run")
    c.add_argument("--model2", default=None, help="model name on URL2 (default: --model, else its first)")
    c.add_argument("--label", default="A", help="name of the first endpoint in tables and plots")
    c.add_argument("--label2", default="B", help="name of the second endpoint")
    c.add_argument("--rounds", type=int, default=2,
                   help="with --compare: rounds per load point, alternated A B B A ...")
    ld = p.add_argument_group("load")
    ld.add_argument("--concurrency", default="1", help="closed loop: requests in flight, a sweep as 1,4,16,64,256")
    ld.add_argument("--request-rate", default=None,
                    help="open loop instead: arrivals per second, a sweep as 1,2,4 (inf: all at once)")
    ld.add_argument("--burstiness", type=float, default=1.0,
                    help="open loop: gamma shape of the arrival gaps; 1 = Poisson, <1 burstier")
    ld.add_argument("--max-concurrency", type=int, default=None, help="open loop: cap on requests in flight")
    ld.add_argument("--num-requests", type=int, default=None,
                    help="measured requests per load point (default: max(100, 4 x concurrency); 100 open loop)")
    ld.add_argument("--duration", type=float, default=None, help="seconds per load point instead of a count")
    ld.add_argument("--warmup", type=int, default=0, help="requests sent before each load point, not measured")
    ld.add_argument("--settle", type=float, default=None,
                    help="seconds of quiet before each measured run (default: 3 with --compare, else 0): "
                         "a server may keep working after its last request (vLLM's CPU build spins a core ~1.5 s)")
    w = p.add_argument_group("workload")
    w.add_argument("--input-len", default="128", help="prompt tokens: N, LO:HI or exp:MEAN")
    w.add_argument("--output-len", default="128", help="max_tokens: N, LO:HI or exp:MEAN (ignore_eos makes it exact)")
    w.add_argument("--prompt-file", default=None,
                   help="JSONL: {\"prompt\": ...} or {\"messages\": [...]}, optional \"output_len\"")
    w.add_argument("--shared-prefix-groups", type=int, default=0,
                   help="N groups whose requests share a system prompt (prefix caching, prefix-affinity routing)")
    w.add_argument("--shared-prefix-len", type=int, default=0, help="tokens in each group's shared prefix")
    w.add_argument("--seed", type=int, default=0, help="prompts, lengths and arrivals are deterministic from it")
    w.add_argument("--tokenizer", default=None,
                   help="local tokenizer (.gguf or HF dir) used when the server has no /tokenize")
    o = p.add_argument_group("output")
    o.add_argument("--slo", default=None, help="goodput limits, e.g. ttft_ms=500,tpot_ms=50 (also e2e_ms)")
    o.add_argument("--out", default=None, help="write all records + summaries + environment as JSON here")
    o.add_argument("--plot", default=None, metavar="DIR", help="write PNG charts into DIR")
    o.add_argument("--keep-text", action="store_true", help="keep output texts in --out")
    o.add_argument("--no-progress", action="store_true", help="no live progress bar")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [math.inf if x.strip().lower() == "inf" else float(x) for x in text.split(",") if x.strip()]


def _headers(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"bad --header {item!r}: use 'Name: value'")
        out[name.strip()] = value.strip()
    return out


def run(a: argparse.Namespace) -> int:
    """Entry of `scalellm bench`; returns the exit code (1 when any request failed)."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        import asyncio

        runner = asyncio.run
    try:
        return runner(_main(a))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


async def _main(a: argparse.Namespace) -> int:
    from rich.console import Console

    from scalellm.bench import results as results_mod
    from scalellm.bench import workload as wl
    from scalellm.bench.endpoint import Endpoint, EndpointConfig
    from scalellm.bench.http_client import HTTPError
    from scalellm.bench.report import RichProgress, print_report
    from scalellm.bench.runner import LoadPoint, Runner
    from scalellm.bench.stats import SLO
    from scalellm.bench.tokens import pick_counter

    console = Console(stderr=True)
    extra_body: dict[str, Any] = json.loads(a.extra_body) if a.extra_body else {}
    if not isinstance(extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    common = dict(api=a.api, is_stream=not a.no_stream, api_key=a.api_key or os.environ.get("OPENAI_API_KEY"),
                  headers=_headers(a.header), ignore_eos=not a.no_ignore_eos, temperature=a.temperature,
                  extra_body=extra_body, timeout=a.timeout)
    configs = [EndpointConfig(url=a.url, model=a.model, label=a.label, **common)]
    if a.compare:
        configs.append(EndpointConfig(url=a.compare, model=a.model2 or a.model, label=a.label2, **common))
    if len({c.label for c in configs}) != len(configs):
        raise ValueError("--label and --label2 must differ")
    endpoints = [Endpoint(c) for c in configs]
    try:
        for ep in endpoints:
            await ep.prepare()
    except HTTPError as e:
        raise RuntimeError(f"cannot reach the server: {e}") from None

    # load points
    if a.request_rate is not None:
        rates = _float_list(a.request_rate)
        if a.duration is not None and any(math.isinf(r) for r in rates):
            raise ValueError("--request-rate inf needs --num-requests, not --duration")
        points = [LoadPoint(request_rate=r, burstiness=a.burstiness, max_concurrency=a.max_concurrency,
                            num_requests=None if a.duration else (a.num_requests or 100), duration=a.duration)
                  for r in rates]
    else:
        points = [LoadPoint(concurrency=c, num_requests=None if a.duration else (a.num_requests or max(100, 4 * c)),
                            duration=a.duration) for c in _int_list(a.concurrency)]
    if not points or any((p.concurrency or 1) < 1 for p in points):
        raise ValueError("give concurrencies >= 1 (or request rates)")
    if a.burstiness <= 0:
        raise ValueError("--burstiness must be > 0")

    # workload
    counter = await pick_counter(endpoints[0], a.tokenizer)
    num_measured = max(p.num_requests for p in points) if not a.duration else (a.num_requests or 1000)
    wcfg = wl.WorkloadConfig(num_requests=a.warmup + num_measured, input_len=wl.LengthSpec.parse(a.input_len),
                             output_len=wl.LengthSpec.parse(a.output_len), is_chat=a.api == "chat",
                             prompt_file=a.prompt_file, shared_prefix_groups=a.shared_prefix_groups,
                             shared_prefix_len=a.shared_prefix_len, seed=a.seed)
    if wcfg.shared_prefix_groups and wcfg.shared_prefix_len < 1:
        raise ValueError("--shared-prefix-groups needs --shared-prefix-len > 0")
    t_build = time.perf_counter()
    console.print(f"building {wcfg.num_requests} prompts (token counts from "
                  f"{counter.source if counter else 'usage only'}) ...")
    requests = await wl.build(wcfg, counter)
    misses = wl.num_fit_misses(requests, wcfg.input_len, wcfg.shared_prefix_len) if not a.prompt_file else 0
    notes = [f"{ep.label}: {n}" for ep in endpoints for n in ep.notes]
    if misses:
        notes.append(f"{misses} prompts could not be fitted to their exact token length (nearest used)")
    if a.duration:
        notes.append("duration-bound points cycle through the prompt pool; repeats may hit the prefix cache")
    workload_doc = {"num_requests": len(requests), "num_warmup": a.warmup, "input_len": str(wcfg.input_len),
                    "output_len": str(wcfg.output_len), "prompt_file": a.prompt_file,
                    "shared_prefix_groups": a.shared_prefix_groups, "shared_prefix_len": a.shared_prefix_len,
                    "seed": a.seed, "token_counter": counter.source if counter else None, "fit_misses": misses,
                    "build_s": time.perf_counter() - t_build}

    # run
    slo = SLO.parse(a.slo) if a.slo else None
    env = results_mod.environment({"event_loop": type(_loop()).__module__})
    t0_perf, t0_unix = time.perf_counter(), time.time()
    settle = a.settle if a.settle is not None else (3.0 if len(endpoints) > 1 else 0.0)
    runner = Runner(endpoints, requests, num_warmup=a.warmup, rounds=a.rounds, seed=a.seed, slo=slo,
                    progress=None if a.no_progress else RichProgress(console), counter=counter, settle_s=settle)
    try:
        results = await runner.run(points)
    finally:
        for ep in endpoints:
            ep.close()
    comparison = Runner.compare(results, endpoints[0].label, endpoints[1].label) if len(endpoints) > 1 else []
    print_report(results, comparison, notes)
    doc = results_mod.build_result(config=vars(a) | {"func": None}, env=env, endpoints=endpoints,
                                   workload=workload_doc, results=results, comparison=comparison,
                                   t0_perf=t0_perf, t0_unix=t0_unix, keep_text=a.keep_text)
    if a.out:
        results_mod.write_result(doc, a.out)
        console.print(f"wrote {a.out}")
    if a.plot:
        from scalellm.bench.plots import write_plots

        for path in write_plots(doc, a.plot):
            console.print(f"wrote {path}")
    return 1 if any(r.summary["num_errors"] for r in results) else 0


def _loop() -> Any:
    import asyncio

    return asyncio.get_running_loop()
