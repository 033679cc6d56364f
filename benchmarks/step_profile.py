"""Where one engine step's time goes, at the serving issue's load shape.

Builds the engine in-process (the same parts the replica uses), admits
--concurrency requests of --input-len random tokens with --output-len ignore_eos
outputs, and runs it to completion with the step's phases timed (prepare,
forward, sample, scheduler + output processing) and, for a few steps in the
steady decode phase, the torch profiler's operator table.

    python benchmarks/step_profile.py --concurrency 64 --input-len 128 --output-len 32
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from scalellm import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--quantization", default=None)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--out", default="")
    a = p.parse_args()
    kw = {"dtype": a.dtype}
    if a.quantization:
        kw["quantization"] = a.quantization
    if a.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = a.max_num_batched_tokens
    llm = LLM(a.model, **kw)
    engine = llm.engine
    runner = engine.core.executor.runner if hasattr(engine.core.executor, "runner") else engine.core.executor
    rng = random.Random(0)
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    for i in range(a.concurrency):
        engine.add_request(f"r{i}", [rng.randrange(100, vocab - 100) for _ in range(a.input_len)], params)
    steps: list[dict] = []
    t_start = time.perf_counter()
    prof = None
    while engine.has_unfinished_requests():
        s = engine.stats()
        t0 = time.perf_counter()
        tm0 = (runner.timings.prepare, runner.timings.forward, runner.timings.sample)
        decode_phase = s.num_waiting == 0 and len(steps) > 0 and steps[-1]["tokens"] == a.concurrency
        if prof is None and decode_phase and a.profile_steps:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
            prof_left = a.profile_steps
        engine.step()
        t1 = time.perf_counter()
        if prof is not None and prof_left > 0:
            prof_left -= 1
            if prof_left == 0:
                prof.__exit__(None, None, None)
        tm1 = (runner.timings.prepare, runner.timings.forward, runner.timings.sample)
        s2 = engine.stats()
        steps.append({"wall_ms": (t1 - t0) * 1e3, "tokens": s2.num_tokens_scheduled - s.num_tokens_scheduled,
                      "prepare_ms": (tm1[0] - tm0[0]) * 1e3, "forward_ms": (tm1[1] - tm0[1]) * 1e3,
                      "sample_ms": (tm1[2] - tm0[2]) * 1e3})
    wall = time.perf_counter() - t_start
    tot = {k: sum(st[k] for st in steps) for k in ("wall_ms", "prepare_ms", "forward_ms", "sample_ms")}
    other = tot["wall_ms"] - tot["prepare_ms"] - tot["forward_ms"] - tot["sample_ms"]
    decode = [st for st in steps if st["tokens"] == a.concurrency]
    summary = {
        "wall_s": wall, "steps": len(steps),
        "share": {k: tot[k] / tot["wall_ms"] for k in ("prepare_ms", "forward_ms", "sample_ms")} | {"other": other / tot["wall_ms"]},
        "out_tok_per_s": a.concurrency * a.output_len / wall,
        "decode_step_ms_mean": sum(st["wall_ms"] for st in decode) / max(len(decode), 1),
        "step_ms_max": max(st["wall_ms"] for st in steps),
        "tokens_per_step_max": max(st["tokens"] for st in steps),
    }
    print(json.dumps(summary, indent=1))
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "summary": summary, "steps": steps}, f, indent=1)


if __name__ == "__main__":
    main()
