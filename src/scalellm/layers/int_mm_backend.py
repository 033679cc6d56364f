"""The int8-rows chain's GEMM (quant.int8.Int8Backend) on CPUs with int8 units where neither
our AMX kernel (layers/amx_gemm.py) nor oneDNN's own int8 linear runs: our AVX-512 VNNI GEMM
(csrc/vnni_gemm.c) where it builds, else torch._int_mm.

NOTE: on an AMD EPYC (Zen 4: AVX-512 VNNI and BF16, no AMX), torch 2.13's
`onednn.qlinear_prepack` lays weights out for a kernel that only oneDNN's reference loop
then takes (~2,000x slower; quant.int8.qlinear_fast tells). torch._int_mm runs oneDNN's VNNI
matmul, but at a c=64 decode step's 64 rows SmolLM2's linears ran on it at ~350-630 GOP/s,
no faster than the bf16 GEMM, and at one row it read the weights at ~6-11 GB/s. Our GEMM
(weights packed once in blocks of 64 channels, 6 x 64 sums in registers) at 64 rows:
600-810 GOP/s; all of SmolLM2's int8 linears cycled from DRAM (106 MB): 1 row 5.1 ms, 16
rows 6.7, 64 rows 20.9, against 4.9 / 12.6 / 32.3 on the VNNI GEMV it replaced (<= 16 rows)
and torch._int_mm + the channel scales. Both compute the same integers with the same
rounding: float32(sum) * the channel's scale, rounded once.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from scalellm.layers import fused_cpu, native
from scalellm.layers.gemm_blocks import BLOCK, pack_blocks

_gemm = native.lazy_vnni_function(
    "vnni_gemm.c", "VNNI GEMM", "sl_gemm_s8",
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
     ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int],
    restype=ctypes.c_int, off_env="SCALELLM_NO_VNNI_GEMM")


def load_gemm() -> bool:
    """Build (once per machine) and load the VNNI GEMM where the CPU and a compiler allow
    (SCALELLM_NO_VNNI_GEMM=1: never)."""
    return _gemm() is not None


def pack(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] int8 codes (K a multiple of 4) -> (the GEMM's layout, `pack_blocks` by quads of
    K; 128 * each channel's code sum [Np] int32, the correction of its x + 128 inputs)."""
    blocks = pack_blocks(q, 4)
    corr = torch.zeros(blocks.shape[0] * BLOCK, dtype=torch.int32)
    corr[:q.shape[0]] = 128 * q.sum(dim=1, dtype=torch.int32)
    return blocks, corr


@dataclass(slots=True, frozen=True)
class IntMmWeight:
    n: int  # output channels
    k: int  # input features
    scales: torch.Tensor  # [N] float32 (padded with zeros to the blocks' channels for the GEMM)
    q: torch.Tensor | None = None  # [N, K] int8 codes for torch._int_mm (where the GEMM does not run)
    blocks: torch.Tensor | None = None  # the GEMM's packed codes (`pack`)
    corr: torch.Tensor | None = None  # [Np] int32, with blocks


class IntMmInt8Backend:
    """codes [T, K] int8 times the weight's codes -> [T, N] in dtype, the channel scales
    applied (the caller multiplies each row by its codes' scale)."""

    @staticmethod
    def supports(q: torch.Tensor) -> bool:
        return q.dim() == 2 and q.dtype == torch.int8 and q.numel() > 0

    @staticmethod
    def prepack(q: torch.Tensor, scales: torch.Tensor) -> IntMmWeight:
        n, k = q.shape
        scales = scales.detach().to(torch.float32).contiguous()
        if k % 4 == 0 and load_gemm():
            blocks, corr = pack(q)
            padded = torch.zeros(blocks.shape[0] * BLOCK, dtype=torch.float32)
            padded[:n] = scales
            return IntMmWeight(n, k, padded, blocks=blocks, corr=corr)
        return IntMmWeight(n, k, scales, q=q.contiguous())

    @staticmethod
    def gemm(codes: torch.Tensor, w: IntMmWeight, dtype: torch.dtype) -> torch.Tensor:
        n, k = w.n, w.k
        if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != k:
            raise TypeError(f"int8 codes [T, {k}] expected, got {codes.dtype} {tuple(codes.shape)}")
        rows = codes.shape[0]
        if rows == 0:
            return torch.empty(0, n, dtype=dtype)
        if w.blocks is not None:
            fn = _gemm()
            assert fn is not None and w.corr is not None
            if codes.stride(1) != 1:
                codes = codes.contiguous()
            out32 = dtype == torch.float32
            out = torch.empty(rows, n, dtype=torch.float32 if out32 else torch.bfloat16)
            if fn(codes.data_ptr(), codes.stride(0), rows, w.blocks.data_ptr(), w.corr.data_ptr(), n, k,
                  out.data_ptr(), n, w.scales.data_ptr(), int(out32), torch.get_num_threads()) != 0:
                raise MemoryError("VNNI GEMM: out of memory for its scratch")
            return out if dtype in (torch.float32, torch.bfloat16) else out.to(dtype)
        assert w.q is not None
        acc = torch._int_mm(codes.contiguous(), w.q.t())
        if fused_cpu.supports_dtype(dtype):
            return fused_cpu.dequant_cols(acc, w.scales, dtype)
        return (acc.float() * w.scales).to(dtype)
