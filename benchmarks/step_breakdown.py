"""Where one decode step's time goes, part by part, in-process, with the CPU kernels A/B.

Builds the engine in-process (default model, dtype auto), admits --concurrency requests
of --input-len random tokens (temperature 1, ignore_eos), runs until all decode, then
times --steps plain steps (median) and --steps more with each part wrapped in a timer:
norms, linears, rotary + KV write, decode attention, SiLU-mul, LM head, sampling (a
wrapped step runs ~10% slower: the timers' own cost). Each variant runs in its own
subprocess with an environment switch, one after the other:

    all        numba kernels + prepacked bf16 weights: AMX GEMM where it loads (the default)
    onednn     SCALELLM_NO_AMX_GEMM=1: bf16 weights prepacked for oneDNN instead
    no-packed  SCALELLM_NO_PACKED_WEIGHTS=1: bf16 linears through F.linear
    no-numba   SCALELLM_NO_NUMBA=1: every numba kernel off (torch paths only)

    python benchmarks/step_breakdown.py --concurrency 64
    python benchmarks/step_breakdown.py --concurrency 1 --variants all,no-packed
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import time

VARIANTS = {"all": {}, "no-packed": {"SCALELLM_NO_PACKED_WEIGHTS": "1"}, "no-numba": {"SCALELLM_NO_NUMBA": "1"},
            "onednn": {"SCALELLM_NO_AMX_GEMM": "1"}}


def measure(a: argparse.Namespace) -> dict:
    import torch

    from scalellm import LLM, SamplingParams
    from scalellm.layers import activation, amx_gemm, attention, embedding, fused_cpu, linear, norm, paged_attention_cpu
    from scalellm.worker import model_runner

    kw = {"quantization": a.quantization} if a.quantization else {}
    llm = LLM(None, kv_cache_dtype=a.kv_cache_dtype, **kw)
    eng = llm.engine
    runner = eng.core.executor.runner if hasattr(eng.core.executor, "runner") else eng.core.executor
    attn0 = runner.model.model.layers[0].self_attn
    fused_cpu.warm_up_model(runner.dtype, runner.args.head_dim, attn0.num_heads, attn0.num_kv_heads)
    while eng.core.idle_work() is not False:  # as a server does when idle: warm-up step, KV pages faulted in
        pass
    rng = random.Random(0)
    params = SamplingParams(temperature=1.0, max_tokens=a.input_len + 4 * a.steps + 64, ignore_eos=True)
    for i in range(a.concurrency):
        eng.add_request(f"r{i}", [rng.randrange(100, 40000) for _ in range(a.input_len)], params)
    while eng.stats().num_waiting or eng.stats().num_running < a.concurrency:
        eng.step()
    for _ in range(3):
        eng.step()
    plain = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        eng.step()
        plain.append((time.perf_counter() - t0) * 1e3)

    acc: dict[str, float] = collections.defaultdict(float)

    def wrap(owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                acc[label] += time.perf_counter() - t0

        setattr(owner, name, timed)

    wrap(norm.RMSNorm, "forward", "norm")
    wrap(linear.LinearBase, "forward", "linears")
    wrap(linear.RowParallelLinear, "forward", "linears")
    wrap(attention.Attention, "forward_qkv", "attention (rotary + KV write + attention)")
    wrap(paged_attention_cpu, "run_rows", "  of which decode attention kernel")
    wrap(fused_cpu, "rope_write_kv", "  of which rotary + KV write kernel")
    wrap(activation.SiluAndMul, "forward", "silu_mul")
    wrap(linear.MergedColumnParallelLinear, "silu_and_mul", "gate_up + SiLU-mul")
    wrap(amx_gemm, "_run", "AMX GEMM kernel calls (all linears, LM head)")
    wrap(embedding.ParallelLMHead, "compute_logits", "lm_head (logits)")
    wrap(model_runner, "sample", "sampling")
    t0 = time.perf_counter()
    for _ in range(a.steps):
        eng.step()
    wrapped = (time.perf_counter() - t0) * 1e3 / a.steps
    return {"dtype": str(runner.dtype), "step_ms_median": statistics.median(plain), "wrapped_step_ms": wrapped,
            "parts_ms_per_step": {k: v * 1e3 / a.steps for k, v in acc.items()},
            "numba": paged_attention_cpu.available(), "packed": any(
                getattr(m, "packed", None) is not None for m in runner.model.modules())}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quantization", default=None)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    p.add_argument("--variants", default="all,no-packed,no-numba")
    p.add_argument("--out", default="")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a)))
        return 0
    results = {}
    for v in a.variants.split(","):
        cmd = [sys.executable, __file__, "--child", "--concurrency", str(a.concurrency), "--input-len",
               str(a.input_len), "--steps", str(a.steps), "--kv-cache-dtype", a.kv_cache_dtype] + (
                   ["--quantization", a.quantization] if a.quantization else [])
        out = subprocess.run(cmd, env=dict(os.environ, **VARIANTS[v]), capture_output=True, text=True, check=True)
        results[v] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[v]
        print(f"{v}: step {r['step_ms_median']:.1f} ms (median of {a.steps}; wrapped {r['wrapped_step_ms']:.1f})", flush=True)
        for k, ms in r["parts_ms_per_step"].items():
            print(f"    {k:44s} {ms:7.2f} ms")
    out_path = a.out or os.path.join(os.path.dirname(__file__), "results",
                                      f"step_breakdown_c{a.concurrency}{'_' + a.quantization if a.quantization else ''}"
                                      f"{'_kv_int8' if a.kv_cache_dtype == 'int8' else ''}.json")
    with open(out_path, "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items() if k != "child"}, "results": results}, f, indent=1)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
