"""The machine's matmul ceiling at the default model's layer shapes, per dtype.

Measures `F.linear` (fp32, bf16), `torch._int_mm` (int8 x int8 -> int32), the
weight-only `torch._weight_int8pack_mm`, fbgemm's dynamic W8A8 linear with per-row
scaling (quant/int8.py on AVX2) and, where the CPU has int8 units, oneDNN's int8 GEMM
on prepacked weights (`qlinear_pointwise`, bf16 out: what --quantization int8 runs with
bf16 activations, layers/int8_rows.py) on the shapes of SmolLM2-135M (hidden 576,
MLP 1536, fused qkv 960, vocab 49152) for a range of row counts (tokens per step),
with the torch thread count the server uses. The best number per dtype is the
"peak" that serving efficiency is reported against (useful FLOP/s / peak).

    python benchmarks/matmul_peak.py --out benchmarks/results/matmul_peak.json
    python benchmarks/matmul_peak.py --rows 1,64,256,1024,4096 --out benchmarks/results/matmul_peak_amx_s12.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from scalellm.quant.int8 import Int8Weight, qlinear_fast

SHAPES = {  # name: (in_features K, out_features N)
    "qkv": (576, 960),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
    "lm_head": (576, 49152),
}


def _time(fn, min_s: float = 0.3) -> float:
    fn()
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s and n >= 3:
            return dt / n


def measure(rows: list[int], shapes: dict[str, tuple[int, int]]) -> list[dict]:
    out = []
    for name, (k, n) in shapes.items():
        w32 = torch.randn(n, k) * 0.05
        w16 = w32.bfloat16()
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        w8t = w8.t()  # [K, N] view; _int_mm wants B as [K, N]
        scales = torch.rand(n) * 0.01
        qw = Int8Weight(w32)
        onednn = Int8Weight(w32, onednn_parts=1) if qlinear_fast() else None
        for m in rows:
            if name == "lm_head" and m > 256:
                continue  # logits are computed only for sampled rows
            x32 = torch.randn(m, k)
            x16 = x32.bfloat16()
            x8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            flop = 2.0 * m * k * n
            row = {"shape": name, "M": m, "K": k, "N": n}
            row["fp32_gflops"] = flop / _time(lambda: F.linear(x32, w32)) / 1e9
            row["bf16_gflops"] = flop / _time(lambda: F.linear(x16, w16)) / 1e9
            if m >= 17:  # _int_mm's CPU path wants M > 16
                row["int8_gops"] = flop / _time(lambda: torch._int_mm(x8, w8t)) / 1e9
            row["w8a32_gflops"] = flop / _time(lambda: torch._weight_int8pack_mm(x32, w8, scales)) / 1e9
            row["fbgemm_int8_gops"] = flop / _time(lambda: qw(x32)) / 1e9  # --quantization int8 on AVX2
            if onednn is not None:
                row["onednn_int8_gops"] = flop / _time(lambda: onednn.gemm(x8, torch.bfloat16)) / 1e9
            out.append(row)
            print(json.dumps({k2: (round(v, 1) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,8,32,64,128,256,512,1024")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = [int(r) for r in a.rows.split(",")]
    res = measure(rows, SHAPES)
    keys = ("fp32_gflops", "bf16_gflops", "int8_gops", "w8a32_gflops", "fbgemm_int8_gops", "onednn_int8_gops")
    peak = {key: max(r[key] for r in res if key in r) for key in keys if any(key in r for r in res)}
    cpu = getattr(torch, "cpu", None)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": a.threads,
                    "torch": torch.__version__,
                    "avx512_bf16": bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()),
                    "amx": bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()),
                    "capability": torch.backends.cpu.get_cpu_capability()},
        "peak": peak,
        "rows": res,
    }
    print(json.dumps(result["peak"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
