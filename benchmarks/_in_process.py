"""Helpers shared by the benchmark scripts that time engine steps in process."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any


def warm_engine(max_num_batched_tokens: int, quantization: str | None = None) -> Any:
    """The default model in an `LLM` whose CPU kernels are compiled and whose idle work (the
    warm-up step, the KV prefault) is done, as a server's would be before its first request."""
    from scalellm import LLM
    from scalellm.layers import fused_cpu

    llm = LLM(None, max_num_batched_tokens=max_num_batched_tokens, quantization=quantization)
    runner = llm.engine.core.executor
    attn0 = runner.model.model.layers[0].self_attn
    fused_cpu.warm_up_model(runner.dtype, runner.args.head_dim, attn0.num_heads, attn0.num_kv_heads)
    while llm.engine.core.idle_work() is not False:
        pass
    return llm


def prefill_stepper(llm: Any, seed: int = 0) -> Callable[[int, int], float]:
    """A function (n, length) -> ms that runs `n` fresh prompts of `length` random tokens to
    their first (sampled) token and returns the wall time: one prefill step when they fit
    the token budget."""
    from scalellm import SamplingParams

    eng = llm.engine
    rng = random.Random(seed)
    params = SamplingParams(temperature=1.0, max_tokens=1, ignore_eos=True)
    count = [0]

    def one_step(n: int, length: int) -> float:
        for _ in range(n):
            eng.add_request(f"r{count[0]}", [rng.randrange(100, 40000) for _ in range(length)], params)
            count[0] += 1
        t0 = time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
        return (time.perf_counter() - t0) * 1e3

    return one_step
