"""A bf16 GEMV of our own (csrc/bf16_gemv.c, AVX-512 BF16) for linears' calls of a few rows
on CPUs without AMX, where oneDNN's bf16 GEMM runs them.

NOTE: on a 2-core AMD EPYC (Zen 4), one-row calls through oneDNN's prepacked bf16 GEMM read
SmolLM2's weights at ~10 GB/s in a decode step (16 of a 24 ms one-sequence step), and the
weights' layout oneDNN packs is its own, so the GEMV reads a plain [N, K] copy kept beside it
(`LinearBase.set_packed`): +156 MB for SmolLM2's linears, for a decode step of one sequence
that is mostly the reading of every weight once.
"""

from __future__ import annotations

import ctypes

import torch

from scalellm.layers import native

# calls of up to this many rows take the GEMV (SCALELLM_NO_BF16_GEMV=1: never). Measured on the
# Zen 4 EPYC, SmolLM2's linears (160 weights, 282 MB, cycled) against oneDNN's prepacked GEMM:
# 1 row 11.4-12.0 vs 15.7-17.6 ms, 4 rows 13.5 vs 14.2-17.3, 8 rows 18.0-18.4 vs 15.8-17.7.
GEMV_MAX_ROWS = 4

_kernel = native.lazy_vnni_function(
    "bf16_gemv.c", "bf16 GEMV", "sl_gemv_bf16",
    [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int],
    bf16=True, off_env="SCALELLM_NO_BF16_GEMV")


def load() -> bool:
    """Build (once per machine) and load the GEMV where the CPU (AVX-512 BF16) and a compiler
    allow."""
    return _kernel() is not None


def supports(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.shape[1] % 32 == 0 and weight.numel() > 0


def takes(x: torch.Tensor) -> bool:
    """Whether a call with input x goes to the GEMV (bf16, a few rows)."""
    return x.dtype == torch.bfloat16 and x.numel() <= GEMV_MAX_ROWS * x.shape[-1] and x.shape[-1] % 32 == 0


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] bf16 @ weight [N, K] bf16 (+ bias [N], best float32: what is added) ->
    [..., N] bf16, float32 sums rounded once. load() first."""
    fn = _kernel()
    assert fn is not None, "bf16_gemv.load() first"
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n, k = weight.shape
    out = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    b32 = bias if bias is None or bias.dtype == torch.float32 else bias.float()
    if x2.shape[0]:
        fn(x2.data_ptr(), x2.stride(0), x2.shape[0], weight.data_ptr(), n, k,
           b32.data_ptr() if b32 is not None else None, out.data_ptr(), n, 0, torch.get_num_threads())
    return out if len(shape) == 2 else out.view(*shape[:-1], n)
