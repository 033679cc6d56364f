"""What `--target-step-ms` does to a c=64 burst, in-process (no serving stack): every step's
shape (decodes, prefill tokens) and time, the cost model's prediction for it, and the
inter-token latency each request sees.

64 requests of 128 random prompt tokens and 128 output tokens (greedy, ignore_eos) arrive
at once; the engine steps until all finish (with --num-requests, each finished request is
replaced by a new one until that many were sent, as `scalellm bench`'s clients do). Per target: output tok/s, ITL p50/p90/p99,
actual/predicted step time percentiles, the fitted cost terms, the steps' running counts.

    flock /work/cpu.lock python benchmarks/itl_target.py --targets 0,150,100 --quantization int8
    python benchmarks/itl_target.py --targets 0,100 --target-ttft-ms 1000 --num-requests 128
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

from scalellm import LLM, SamplingParams
from scalellm.layers import fused_cpu
from scalellm.memory import keep_freed_heap

HERE = os.path.dirname(os.path.abspath(__file__))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[int(q * (len(xs) - 1))] if xs else float("nan")


def run(target: float, args: argparse.Namespace) -> dict:
    llm = LLM(None, quantization=args.quantization, dtype=args.dtype, target_step_ms=target or None,
              target_ttft_ms=args.target_ttft_ms or None, max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.engine
    runner = engine.core.executor
    attn0 = runner.model.model.layers[0].self_attn
    fused_cpu.warm_up_model(runner.dtype, runner.args.head_dim, attn0.num_heads, attn0.num_kv_heads)
    while engine.core.idle_work() is not False:  # as a server does when idle: warm-up step, KV pages faulted in
        pass
    sched = engine.core.scheduler
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    steps: list[dict] = []
    predicted: list[float | None] = [None]

    schedule, observe = sched.schedule, sched.observe_step

    def timed_schedule():  # type: ignore[no-untyped-def]
        out = schedule()
        d, p = sched.step_shape(out)
        predicted[0] = sched.step_cost.predict(d, p) if sched.step_cost.is_fitted and (d or p) else None
        steps.append({"decodes": d, "prefill": p, "running": len(sched.running)})
        return out

    def timed_observe(out, seconds: float) -> None:  # type: ignore[no-untyped-def]
        steps[-1]["ms"] = seconds * 1e3
        if predicted[0] is not None:
            steps[-1]["predicted_ms"] = predicted[0] * 1e3
        observe(out, seconds)

    sched.schedule, sched.observe_step = timed_schedule, timed_observe  # type: ignore[method-assign]
    total = max(args.num_requests, args.concurrency)
    sent = 0
    arrived: dict[str, float] = {}

    def send() -> None:
        nonlocal sent
        engine.add_request(f"r{sent}", [rng.randrange(100, 40000) for _ in range(args.input_len)], params)
        arrived[f"r{sent}"] = time.perf_counter()
        sent += 1

    for _ in range(args.concurrency):
        send()
    last: dict[str, float] = {}
    itl: list[float] = []
    ttft: list[float] = []
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id in last:
                itl.append((now - last[o.request_id]) * 1e3)
            else:
                ttft.append((now - arrived[o.request_id]) * 1e3)
            last[o.request_id] = now
            if o.finished and sent < total:  # closed loop: a finished request's client sends the next
                send()
    wall = time.perf_counter() - t0
    llm.shutdown()
    ratios = [s["ms"] / s["predicted_ms"] for s in steps if "predicted_ms" in s and "ms" in s]
    coef = sched.step_cost.coefficients
    return {
        "target_step_ms": target,
        "target_ttft_ms": args.target_ttft_ms or None,
        "output_tok_s": total * args.output_len / wall,
        "itl_ms": {q: pct(itl, f) for q, f in (("p50", .5), ("p90", .9), ("p99", .99), ("max", 1.0))},
        "ttft_ms": {q: pct(ttft, f) for q, f in (("p50", .5), ("p99", .99), ("max", 1.0))},
        "actual_over_predicted": {q: pct(ratios, f) for q, f in (("p10", .1), ("p50", .5), ("p90", .9), ("p99", .99))},
        "cost_terms_ms": {"per_step": coef[0] * 1e3, "per_decode": coef[1] * 1e3, "per_prefill_token": coef[2] * 1e3}
        if coef else None,
        "running_median": statistics.median(s["running"] for s in steps if s.get("decodes")),
        "steps": steps,
    }


def main() -> None:
    keep_freed_heap()  # as the engine core process does
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="0,150,100", help="target_step_ms values (0: off)")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096, help="token budget (serve's default)")
    ap.add_argument("--target-ttft-ms", type=float, default=0, help="with each target: the TTFT goal (0: off)")
    ap.add_argument("--num-requests", type=int, default=0,
                    help="closed loop: each finished request is replaced until this many were sent (default: one wave)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "itl_target.json"))
    args = ap.parse_args()
    results = []
    for target in (float(t) for t in args.targets.split(",")):
        r = run(target, args)
        print(f"target {target:g} ms: {r['output_tok_s']:.1f} out tok/s, ITL p50/p90/p99 "
              f"{r['itl_ms']['p50']:.0f}/{r['itl_ms']['p90']:.0f}/{r['itl_ms']['p99']:.0f} ms, TTFT p50/max "
              f"{r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['max']:.0f} ms, running (median) "
              f"{r['running_median']:g}, actual/predicted p50/p99 {r['actual_over_predicted']['p50']:.2f}/"
              f"{r['actual_over_predicted']['p99']:.2f}, cost terms {r['cost_terms_ms']}", flush=True)
        results.append(r)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "runs": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
