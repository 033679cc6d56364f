"""The int8-rows chain's GEMM (quant.int8.Int8Backend) on CPUs with int8 units where neither
our AMX kernel (layers/amx_gemm.py) nor oneDNN's own int8 linear runs: torch._int_mm, and
for calls of a few rows our AVX-512 VNNI GEMV (csrc/vnni_gemv.c).

NOTE: on an AMD EPYC (Zen 4: AVX-512 VNNI and BF16, no AMX), torch 2.13's
`onednn.qlinear_prepack` lays weights out for a kernel that only oneDNN's reference loop
then takes (~2,000x slower; quant.int8.qlinear_fast tells), while torch._int_mm runs
oneDNN's VNNI matmul: 660-830 GOP/s at SmolLM2's shapes, 1.7-2.3x the bf16 GEMM
(benchmarks/matmul_peak.py). Its int32 sums get the weight's channel scales in one pass
(fused_cpu.dequant_cols), so a part comes out as oneDNN's int8 GEMM writes it with an input
scale of 1, the row scales left to the chain. At one row torch._int_mm read the weights at
~6-11 GB/s; the GEMV streams them at ~21 (same integers, same rounding).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from scalellm.layers import fused_cpu, native

# calls of up to this many rows take the GEMV where it loads (SCALELLM_NO_VNNI_GEMV=1: never).
# Measured on the Zen 4 EPYC, SmolLM2's linears (200 int8 weights, 142 MB, cycled), GEMV vs
# torch._int_mm: 1 row 6.7 vs 12.2-12.7 ms, 4 rows 8.7 vs 16.9, 8 rows 10.4 vs 18.9, 16 rows
# 14.7-21.5 vs 25.0-41.0, 24 rows 19.9-26.4 vs 29.5-34.4; at 64 rows torch._int_mm's blocked
# kernel is the one (724 GOP/s at gate_up's shape).
GEMV_MAX_ROWS = 16

_gemv = native.lazy_vnni_function(
    "vnni_gemv.c", "VNNI GEMV", "sl_gemv_s8",
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
     ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int],
    restype=ctypes.c_int, off_env="SCALELLM_NO_VNNI_GEMV")


def load_gemv() -> bool:
    """Build (once per machine) and load the VNNI GEMV where the CPU and a compiler allow."""
    return _gemv() is not None


@dataclass(slots=True, frozen=True)
class IntMmWeight:
    q: torch.Tensor  # [N, K] int8 codes, contiguous (torch._int_mm reads q.t())
    scales: torch.Tensor  # [N] float32
    wsum: torch.Tensor | None  # [N] int32: each channel's sum of codes (the GEMV's), where it runs


class IntMmInt8Backend:
    """codes [T, K] int8 times the weight's codes -> [T, N] in dtype, the channel scales
    applied (the caller multiplies each row by its codes' scale)."""

    @staticmethod
    def supports(q: torch.Tensor) -> bool:
        return q.dim() == 2 and q.dtype == torch.int8 and q.numel() > 0

    @staticmethod
    def prepack(q: torch.Tensor, scales: torch.Tensor) -> IntMmWeight:
        q = q.contiguous()
        wsum = q.sum(dim=1, dtype=torch.int32) if q.shape[1] % 64 == 0 and load_gemv() else None
        return IntMmWeight(q, scales.detach().to(torch.float32).contiguous(), wsum)

    @staticmethod
    def gemm(codes: torch.Tensor, w: IntMmWeight, dtype: torch.dtype) -> torch.Tensor:
        n, k = w.q.shape
        if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != k:
            raise TypeError(f"int8 codes [T, {k}] expected, got {codes.dtype} {tuple(codes.shape)}")
        rows = codes.shape[0]
        if rows == 0:
            return torch.empty(0, n, dtype=dtype)
        if rows <= GEMV_MAX_ROWS and w.wsum is not None and dtype in (torch.bfloat16, torch.float32):
            fn = _gemv()
            assert fn is not None
            if codes.stride(1) != 1:
                codes = codes.contiguous()
            out = torch.empty(rows, n, dtype=dtype)
            if fn(codes.data_ptr(), codes.stride(0), rows, w.q.data_ptr(), w.wsum.data_ptr(), n, k, out.data_ptr(),
                  n, w.scales.data_ptr(), int(dtype == torch.float32), torch.get_num_threads()) == 0:
                return out
        acc = torch._int_mm(codes.contiguous(), w.q.t())
        if fused_cpu.supports_dtype(dtype):
            return fused_cpu.dequant_cols(acc, w.scales, dtype)
        return (acc.float() * w.scales).to(dtype)
