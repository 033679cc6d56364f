"""The CPU prefill attention kernel (layers/causal_attention_cpu.py: its AMX build, else its
AVX-512 BF16 one) against torch's SDPA path, in process, alternated round by round in one
engine (the kernel switched off by unloading it):

- fresh: `--prompts` fresh prompts of `--prompt-len` tokens, one prefill step
  (`LLM.generate`, one output token each);
- cached: `--prompts` requests of `--prefix-len` cached tokens (a prefix generated once
  before) + `--suffix-len` new ones: chunks that continue a cached context.

Default model, bfloat16. Prints and writes (`--out`) the per-round times and their medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default="")
    a = p.parse_args()

    from scalellm import LLM, SamplingParams
    from scalellm.layers import causal_attention_cpu as attn

    if not attn.load():
        print("the kernel is not available here (no AMX or AVX-512 BF16 CPU, or no C compiler)", file=sys.stderr)
        return 1
    llm = LLM(dtype="bfloat16", max_model_len=2048,
              max_num_batched_tokens=max(4096, a.prompts * max(a.prompt_len, a.suffix_len)))
    runner = llm.engine.core.executor
    while not runner.kernels_ready():  # the numba kernels, as serving runs them
        time.sleep(0.1)
    rng = random.Random(0)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prefix = [rng.randrange(100, 40000) for _ in range(a.prefix_len)]
    llm.generate([prefix + [5]], one)  # into the prefix cache

    def words(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    workloads = {
        "fresh": lambda: [words(a.prompt_len) for _ in range(a.prompts)],
        "cached": lambda: [prefix + words(a.suffix_len) for _ in range(a.prompts)],
    }
    kernel = attn._fn
    times: dict[str, dict[str, list[float]]] = {w: {"kernel": [], "torch": []} for w in workloads}
    for w, make in workloads.items():
        for _ in range(2):  # warm both paths
            for path in ("kernel", "torch"):
                attn._fn = kernel if path == "kernel" else None
                llm.generate(make(), one)
        for _ in range(a.rounds):
            for path in ("kernel", "torch"):
                attn._fn = kernel if path == "kernel" else None
                prompts = make()
                t0 = time.perf_counter()
                llm.generate(prompts, one)
                times[w][path].append((time.perf_counter() - t0) * 1e3)
    attn._fn = kernel
    out = {"config": vars(a), "kernel": attn.backend(), "ms": times,
           "median_ms": {w: {k: statistics.median(v) for k, v in d.items()} for w, d in times.items()}}
    for w, d in out["median_ms"].items():
        print(f"{w:7s} {attn.backend()} {d['kernel']:7.1f} ms   torch SDPA {d['torch']:7.1f} ms   "
              f"({d['kernel'] / d['torch']:.2f}x)  "
              f"rounds: {[round(x) for x in times[w]['kernel']]} / {[round(x) for x in times[w]['torch']]}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
