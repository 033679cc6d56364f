"""Where one prefill step's time goes, in process: --prompts fresh prompts of --prompt-len random
tokens in one step (the token budget is set to fit them), default model, dtype auto.

Times --steps plain steps (median), then as many with each part wrapped in a timer (a wrapped
step runs a few % slower): norms, linears (and every oneDNN int8 GEMM by its output width),
attention (causal SDPA, rotary + KV write), the MLP's gate/up + SiLU-mul, the int8-rows kernels
(quantising RMSNorm, SiLU-mul, row quantisation), LM head, sampling. Nested parts are indented
and counted in their parent too.

    python benchmarks/prefill_breakdown.py                       # 32 x 128 tokens, bf16
    python benchmarks/prefill_breakdown.py --quantization int8
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _in_process import prefill_stepper, warm_engine  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--quantization", default=None)
    p.add_argument("--out", default="")
    a = p.parse_args()

    from scalellm.layers import attention, causal_attention_cpu, embedding, fused_cpu, linear, norm
    from scalellm.quant import int8
    from scalellm.worker import model_runner

    n, length = a.prompts, a.prompt_len
    llm = warm_engine(n * length, a.quantization)
    runner = llm.engine.core.executor
    step = prefill_stepper(llm)

    def one_step() -> float:
        return step(n, length)

    for _ in range(2):
        one_step()
    plain = [one_step() for _ in range(a.steps)]

    acc: dict[str, float] = collections.defaultdict(float)

    def wrap(owner: Any, name: str, label: str, key: Callable[..., str] | None = None) -> None:
        f = getattr(owner, name)

        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                acc[key(*args) if key else label] += time.perf_counter() - t0

        setattr(owner, name, timed)

    wrap(norm.RMSNorm, "forward", "norm")
    wrap(fused_cpu, "norm_quant", "  norm + quantise (int8 rows)")
    wrap(linear.LinearBase, "forward", "linears (qkv, o, down)")
    wrap(linear.RowParallelLinear, "forward", "linears (qkv, o, down)")
    wrap(fused_cpu, "quant_rows", "  quantise o's input (int8 rows)")
    wrap(attention.Attention, "forward_qkv", "attention")
    wrap(attention, "_sdpa", "  causal SDPA")
    wrap(causal_attention_cpu, "run", "  causal attention (CPU kernel)")
    wrap(fused_cpu, "rope_write_kv", "  rotary + KV write")
    wrap(linear.MergedColumnParallelLinear, "silu_and_mul", "gate/up + SiLU-mul")
    wrap(fused_cpu, "silu_mul_quant", "  SiLU-mul + quantise (int8 rows)")
    wrap(int8.Int8Weight, "gemm", "", key=lambda self, *_: f"  int8 GEMMs, N={self.out_features}")
    wrap(runner.model.model, "forward", "model forward")
    wrap(embedding.ParallelLMHead, "compute_logits", "LM head")
    wrap(model_runner, "sample", "sampling")
    wrapped = [one_step() for _ in range(a.steps)]
    parts = {k: v * 1e3 / a.steps for k, v in acc.items()}
    out = {"config": vars(a), "tokens": n * length, "step_ms_median": statistics.median(plain),
           "step_ms": plain, "wrapped_step_ms_median": statistics.median(wrapped), "parts_ms": parts}
    print(f"{n} x {length} tokens ({a.quantization or 'bf16/auto'}): step {out['step_ms_median']:.1f} ms median "
          f"(all {[round(x) for x in plain]}), wrapped {out['wrapped_step_ms_median']:.1f}")
    for k, v in parts.items():
        print(f"  {k:36s} {v:7.1f} ms")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
