"""torch._int_mm as the int8-rows chain's GEMM (quant.int8.Int8Backend) on CPUs with int8
units where neither our AMX kernel (layers/amx_gemm.py) nor oneDNN's own int8 linear runs.

NOTE: on an AMD EPYC (Zen 4: AVX-512 VNNI and BF16, no AMX), torch 2.13's
`onednn.qlinear_prepack` lays weights out for a kernel that only oneDNN's reference loop
then takes (~2,000x slower; quant.int8.qlinear_fast tells), while torch._int_mm runs
oneDNN's VNNI matmul: 660-830 GOP/s at SmolLM2's shapes, 1.7-2.3x the bf16 GEMM
(benchmarks/matmul_peak.py). Its int32 sums get the weight's channel scales in one pass
(fused_cpu.dequant_cols), so a part comes out as oneDNN's int8 GEMM writes it with an input
scale of 1, the row scales left to the chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scalellm.layers import fused_cpu


@dataclass(slots=True, frozen=True)
class IntMmWeight:
    q_t: torch.Tensor  # [K, N] int8: the [N, K] codes transposed (a view: _int_mm reads it as is)
    scales: torch.Tensor  # [N] float32


class IntMmInt8Backend:
    """codes [T, K] int8 times the weight's codes through torch._int_mm -> [T, N] in dtype,
    the channel scales applied (the caller multiplies each row by its codes' scale)."""

    @staticmethod
    def supports(q: torch.Tensor) -> bool:
        return q.dim() == 2 and q.dtype == torch.int8 and q.numel() > 0

    @staticmethod
    def prepack(q: torch.Tensor, scales: torch.Tensor) -> IntMmWeight:
        return IntMmWeight(q.contiguous().t(), scales.detach().to(torch.float32).contiguous())

    @staticmethod
    def gemm(codes: torch.Tensor, w: IntMmWeight, dtype: torch.dtype) -> torch.Tensor:
        if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != w.q_t.shape[0]:
            raise TypeError(f"int8 codes [T, {w.q_t.shape[0]}] expected, got {codes.dtype} {tuple(codes.shape)}")
        if codes.shape[0] == 0:
            return torch.empty(0, w.q_t.shape[1], dtype=dtype)
        acc = torch._int_mm(codes.contiguous(), w.q_t)
        probe = torch.empty(0, dtype=dtype)
        if fused_cpu.supports(probe):
            return fused_cpu.dequant_cols(acc, w.scales, dtype)
        return (acc.float() * w.scales).to(dtype)
