"""bf16 linear layers on Intel AMX: weights prepacked into tiles, a small C GEMM (csrc/amx_gemm.c).

oneDNN's prepacked bf16 GEMM (what `torch.ops.mkldnn._linear_pointwise` runs) reads weights
at 10-15 GB/s in decode-sized calls on the 2-core AMX Xeon, where the machine streams 20-35:
a decode step is mostly the reading of every weight once. This kernel streams each thread's
share of the packed weight once per call, accumulates 32 x 32 output blocks in AMX tiles and
writes them through an epilogue (bf16 or float32, a bias, or SiLU(gate) * up for a merged
gate/up projection: the MLP's activation never leaves the kernel). Measured at SmolLM2's layer
shapes, weights out of L2: 1.3-2.3x oneDNN's speed at 1-256 rows (see csrc/amx_gemm.c).

`pack` lays a [N, K] weight out for the kernel (torch ops only); `matmul` and `silu_mul` run
it. The library is compiled on first use (`layers/native.py`); without AMX, a compiler, or with
SCALELLM_NO_AMX_GEMM=1, `load()` is False and callers keep oneDNN's or torch's GEMM. Knows
nothing of models: a weight in, rows in, rows out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from scalellm.layers import native

logger = logging.getLogger(__name__)

_KIND_BF16, _KIND_FP32, _KIND_SWIGLU, _KIND_SPLIT = 0, 1, 2, 3

_lock = threading.Lock()
_fn = None  # the loaded sl_gemm
_fn_s8 = None  # the loaded sl_gemm_s8
_tried = False


def load() -> bool:
    """Build (once per machine) and load the kernel where the CPU and a compiler allow;
    returns `ready()`. Safe to call from any thread, any number of times."""
    global _fn, _fn_s8, _tried
    if _tried:
        return _fn is not None
    with _lock:
        if _tried:
            return _fn is not None
        _tried = True
        if os.environ.get("SCALELLM_NO_AMX_GEMM"):
            return False
        t0 = time.monotonic()
        lib = native.load_amx_library("amx_gemm.c", "AMX GEMM")
        if lib is None:
            return False
        fn = lib.sl_gemm
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        fn_s8 = lib.sl_gemm_s8
        fn_s8.restype = None
        fn_s8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        _fn, _fn_s8 = fn, fn_s8
        logger.debug("AMX GEMM ready in %.2fs", time.monotonic() - t0)
        return True


def ready() -> bool:
    return _fn is not None


@dataclass(frozen=True, slots=True)
class AmxWeight:
    """A [N, K] bf16 weight in the kernel's tile layout. swiglu: a merged [gate | up] weight
    packed block by block as (gate, up) pairs, for `silu_mul` (`matmul` still gives [gate | up])."""

    tiles: torch.Tensor  # [N * K] bf16
    n: int
    k: int
    swiglu: bool

    @property
    def nbytes(self) -> int:
        return self.tiles.numel() * self.tiles.element_size()


def supports(weight: torch.Tensor) -> bool:
    """Whether `pack` takes this weight: the kernel is loaded, a 2-D bf16 CPU weight with output
    features a multiple of 32 (so a [gate | up] pair halves into whole 16-column blocks) and
    inputs a multiple of 32."""
    if _fn is None or weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return False
    n, k = weight.shape
    return n > 0 and k > 0 and n % 32 == 0 and k % 32 == 0


def _tiles(w: torch.Tensor) -> torch.Tensor:
    # W[16b + c][32t + 2i + e] -> tile (b, t) at [i][c][e]
    n, k = w.shape
    return w.reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous().view(-1)


def pack(weight: torch.Tensor, swiglu: bool = False) -> AmxWeight:
    """weight [N, K] bf16 (`supports`) -> its tiles. swiglu: weight is [gate | up] (N/2 rows each)."""
    w = weight.detach()
    n, k = w.shape
    if swiglu:  # blocks of 16 rows: gate 0, up 0, gate 1, up 1, ...
        gate, up = w.split(n // 2)
        w = torch.stack([gate.reshape(n // 32, 16, k), up.reshape(n // 32, 16, k)], dim=1).reshape(n, k)
    return AmxWeight(_tiles(w), n, k, swiglu)


def _run(x: torch.Tensor, w: AmxWeight, out: torch.Tensor, kind: int, bias: torch.Tensor | None) -> None:
    fn = _fn
    assert fn is not None, "amx_gemm.load() first"
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()  # (no copy if it is already)
    fn(x.data_ptr(), x.stride(0), x.shape[0], w.tiles.data_ptr(), w.n, w.k, out.data_ptr(), out.stride(0), kind,
       None if b is None else b.data_ptr(), torch.get_num_threads())


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as bf16 rows the kernel reads in place where it can ([T, K], unit stride in a row)."""
    if x.dtype != torch.bfloat16:
        raise TypeError(f"the AMX GEMM takes bf16 rows, not {x.dtype}")
    if x.dim() == 2 and x.stride(1) == 1 and x.shape[1] == k:  # a decode step's rows: as they are
        return x
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(1) == 1 and (x2.shape[0] <= 1 or x2.stride(0) >= k) else x2.contiguous()


def matmul(x: torch.Tensor, w: AmxWeight, bias: torch.Tensor | None = None, out_float32: bool = False) -> torch.Tensor:
    """x [..., K] bf16 @ W^T (+ bias) -> [..., N], bf16 (rounded to nearest even from the float32
    accumulators) or float32."""
    x2 = _rows(x, w.k)
    out = torch.empty(x2.shape[0], w.n, dtype=torch.float32 if out_float32 else torch.bfloat16)
    if w.swiglu:
        if bias is not None or out_float32:
            raise ValueError("a swiglu-packed weight gives bf16 [gate | up] without a bias")
        kind = _KIND_SPLIT
    else:
        kind = _KIND_FP32 if out_float32 else _KIND_BF16
    if x2.shape[0]:
        _run(x2, w, out, kind, bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], w.n)


def silu_mul(x: torch.Tensor, w: AmxWeight) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for a swiglu-packed [gate | up] weight: x [T, K] bf16 ->
    [T, N/2] bf16, both products and the activation in float32, rounded once."""
    if not w.swiglu:
        raise ValueError("silu_mul needs a weight packed with swiglu=True")
    x2 = _rows(x, w.k)
    out = torch.empty(x2.shape[0], w.n // 2, dtype=torch.bfloat16)
    if x2.shape[0]:
        _run(x2, w, out, _KIND_SWIGLU, None)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], w.n // 2)


# ---- int8: the GEMM of the int8-rows chain (layers/int8_rows.py), in place of oneDNN's ----


@dataclass(frozen=True, slots=True)
class AmxInt8Weight:
    """An int8 [N, K] weight (symmetric, one float32 scale per output channel) in tiles of 4 K
    values to a lane (TDPBSSD's B operand)."""

    tiles: torch.Tensor  # [N * K] int8
    scales: torch.Tensor  # [N] float32
    n: int
    k: int


class AmxInt8Backend:
    """`quant.int8.Int8Weight`'s GEMM backend (its `prepack` and `gemm` hooks): codes [T, K]
    int8 with one scale a row (applied by the caller) times the weight, the weight's channel
    scales applied, as oneDNN's int8 GEMM with an input scale of 1 computes it. At decode sizes
    the weight's reading is the cost: half a bf16 weight's bytes, streamed as the bf16 GEMM
    streams its own."""

    @staticmethod
    def supports(q: torch.Tensor) -> bool:
        n, k = q.shape
        return _fn_s8 is not None and n % 32 == 0 and k % 64 == 0 and n > 0 and k > 0

    @staticmethod
    def prepack(q: torch.Tensor, scales: torch.Tensor) -> AmxInt8Weight:
        n, k = q.shape
        tiles = q.reshape(n // 16, 16, k // 64, 16, 4).permute(0, 2, 3, 1, 4).contiguous().view(-1)
        return AmxInt8Weight(tiles, scales.detach().to(torch.float32).contiguous(), n, k)

    @staticmethod
    def gemm(codes: torch.Tensor, w: AmxInt8Weight, dtype: torch.dtype) -> torch.Tensor:
        fn = _fn_s8
        assert fn is not None, "amx_gemm.load() first"
        if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != w.k:
            raise TypeError(f"int8 codes [T, {w.k}] expected, got {codes.dtype} {tuple(codes.shape)}")
        if codes.stride(1) != 1 or (codes.shape[0] > 1 and codes.stride(0) < w.k):
            codes = codes.contiguous()
        out32 = dtype == torch.float32
        if not out32 and dtype != torch.bfloat16:
            raise TypeError(f"the AMX int8 GEMM writes bf16 or float32, not {dtype}")
        out = torch.empty(codes.shape[0], w.n, dtype=dtype)
        if codes.shape[0]:
            fn(codes.data_ptr(), codes.stride(0), codes.shape[0], w.tiles.data_ptr(), w.n, w.k, out.data_ptr(),
               out.stride(0), w.scales.data_ptr(), int(out32), torch.get_num_threads())
        return out


def int8_backend() -> AmxInt8Backend | None:
    """The int8 backend where the kernel loads (`load()`), else None (oneDNN's int8 GEMM)."""
    return AmxInt8Backend() if load() and _fn_s8 is not None else None
