"""A bf16 GEMM of our own (csrc/bf16_gemm.c, AVX-512 BF16) for every linear's calls on CPUs
without AMX, in place of oneDNN's prepacked bf16 GEMM.

NOTE: on a 2-core AMD EPYC (Zen 4), against oneDNN's prepacked GEMM, SmolLM2's shapes in
cache: 64 rows 408-442 vs 307-426 GFLOP/s, 4,096 rows 397-433 vs 395-422, 1-4 rows 2-3x;
all of SmolLM2's linears cycled from DRAM (212 MB): 1 row 7.5 vs 13.3 ms, 8 rows 8.5 vs 13.6,
64 rows 37.6 vs 47.5. It replaced oneDNN's layout and a plain copy kept beside it for a
few-row GEMV (+156 MB): one packed copy of each weight serves all row counts.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from scalellm.layers import native
from scalellm.layers.gemm_blocks import BLOCK, pack_blocks

_kernel = native.lazy_vnni_function(
    "bf16_gemm.c", "bf16 GEMM", "sl_gemm_bf16",
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
     ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int],
    bf16=True, off_env="SCALELLM_NO_BF16_GEMM")
_swiglu = native.lazy_vnni_function(
    "bf16_gemm.c", "bf16 GEMM", "sl_silu_mul_bf16",
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
     ctypes.c_void_p, ctypes.c_int64, ctypes.c_int],
    bf16=True, off_env="SCALELLM_NO_BF16_GEMM")


@dataclass(slots=True, frozen=True)
class Bf16Blocks:
    """A [N, K] bf16 weight in the GEMM's layout: blocks of 64 output channels, each channel's
    2 values of a pair of K together, N padded with zero channels to a multiple of 64."""

    blocks: torch.Tensor  # [Np / 64, K / 2, 64, 2] bf16
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size()


def load() -> bool:
    """Build (once per machine) and load the GEMM where the CPU (AVX-512 BF16) and a compiler
    allow (SCALELLM_NO_BF16_GEMM=1: never)."""
    return _kernel() is not None


def supports(weight: torch.Tensor) -> bool:
    """Whether `pack` takes this weight (a 2-D bf16 CPU weight, K even)."""
    return (weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and weight.shape[1] % 2 == 0 and weight.numel() > 0)


def takes(weight: torch.Tensor) -> bool:
    """Whether this weight goes to the GEMM: it supports it and the GEMM loads here."""
    return supports(weight) and load()


def pack(weight: torch.Tensor) -> Bf16Blocks:
    return Bf16Blocks(pack_blocks(weight, 2), *weight.shape)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] bf16 as [T, K] rows the kernels read: whole pairs, 4-byte aligned."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.bfloat16 or x2.shape[1] != k:
        raise TypeError(f"bf16 [T, {k}] expected, got {x2.dtype} {tuple(x2.shape)}")
    if x2.stride(-1) != 1 or x2.stride(0) % 2 or x2.data_ptr() % 4:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    return x2


def matmul(x: torch.Tensor, w: Bf16Blocks, bias: torch.Tensor | None = None, out_float32: bool = False) -> torch.Tensor:
    """x [..., K] bf16 @ W^T (+ bias [N], best float32: what is added) -> [..., N], bf16 (the
    float32 sums rounded once, nearest even) or float32. load() first."""
    fn = _kernel()
    assert fn is not None, "bf16_gemm.load() first"
    shape = x.shape
    x2 = _rows(x, w.k)
    out = torch.empty(x2.shape[0], w.n, dtype=torch.float32 if out_float32 else torch.bfloat16)
    b32 = bias if bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()) else bias.float().contiguous()
    if x2.shape[0]:
        fn(x2.data_ptr(), x2.stride(0), x2.shape[0], w.blocks.data_ptr(), b32.data_ptr() if b32 is not None else None,
           w.n, w.k, out.data_ptr(), w.n, int(out_float32), torch.get_num_threads())
    return out if len(shape) == 2 else out.view(*shape[:-1], w.n)


def takes_swiglu(w: Bf16Blocks) -> bool:
    """Whether `silu_mul` takes this [gate | up] weight: each half a whole number of blocks."""
    return w.n % (2 * BLOCK) == 0


def silu_mul(x: torch.Tensor, w: Bf16Blocks) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for a [gate | up] weight packed whole (`pack`): x [T, K]
    bf16 -> [T, N/2] bf16, both products and the activation in float32, rounded once; the
    merged output is never written. takes_swiglu(w) first."""
    fn = _swiglu()
    assert fn is not None and takes_swiglu(w), "bf16_gemm.load() and takes_swiglu(w) first"
    x2 = _rows(x, w.k)
    half = w.n // 2
    out = torch.empty(x2.shape[0], half, dtype=torch.bfloat16)
    if x2.shape[0]:
        fn(x2.data_ptr(), x2.stride(0), x2.shape[0], w.blocks.data_ptr(), half, w.k, out.data_ptr(), half,
           torch.get_num_threads())
    return out
