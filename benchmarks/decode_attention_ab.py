"""Fused CPU decode attention (numba) vs gather + SDPA, A/B on alternate engine steps.

Builds the engine in-process, admits --concurrency requests of --input-len random
tokens with --output-len ignore_eos outputs, and once every request is decoding,
switches the decode attention path on every step (fused, torch, fused, ...), so
both paths see the same machine, the same batch and contexts that grow by one
token per step. Reports the median step time per path, and the attention's own
time per step (the Attention modules timed with perf_counter around each call).

    python benchmarks/decode_attention_ab.py --quantization int8
    python benchmarks/decode_attention_ab.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from scalellm import LLM, SamplingParams
from scalellm.layers import attention, paged_attention_cpu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--out", default="")
    a = p.parse_args()
    kw: dict = {"dtype": a.dtype}
    if a.quantization:
        kw["quantization"] = a.quantization
    llm = LLM(None, **kw)
    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    for i in range(a.concurrency):
        engine.add_request(f"r{i}", [rng.randrange(100, engine.vocab_size - 100) for _ in range(a.input_len)], params)

    use_fused = {"on": True}
    real_supports = paged_attention_cpu.supports
    attention.paged_attention_cpu.supports = lambda cache, heads: use_fused["on"] and real_supports(cache, heads)  # type: ignore
    attn_time = {"s": 0.0}
    real_forward = attention.Attention.forward

    def timed_forward(self, q, k, v, batch):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = real_forward(self, q, k, v, batch)
        attn_time["s"] += time.perf_counter() - t0
        return out

    attention.Attention.forward = timed_forward  # type: ignore[method-assign]
    rows: dict[str, list[tuple[float, float]]] = {"fused": [], "torch": []}
    while engine.has_unfinished_requests():
        before = engine.stats()
        decoding = before.num_waiting == 0 and before.num_running == a.concurrency
        use_fused["on"] = not decoding or len(rows["fused"]) <= len(rows["torch"])
        attn_time["s"] = 0.0
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        tokens = engine.stats().num_tokens_scheduled - before.num_tokens_scheduled
        if decoding and tokens == a.concurrency:
            rows["fused" if use_fused["on"] else "torch"].append((wall * 1e3, attn_time["s"] * 1e3))
    summary = {"args": vars(a), "steps": {k: len(v) for k, v in rows.items()}}
    for name, vals in rows.items():
        summary[name] = {"step_ms_median": statistics.median(v[0] for v in vals),
                         "attention_ms_median": statistics.median(v[1] for v in vals)}
    summary["step_ratio_fused_over_torch"] = summary["fused"]["step_ms_median"] / summary["torch"]["step_ms_median"]
    summary["attention_ratio_fused_over_torch"] = (summary["fused"]["attention_ms_median"]
                                                   / summary["torch"]["attention_ms_median"])
    print(json.dumps(summary, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary | {"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
