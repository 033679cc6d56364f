"""Dynamic int8 linears (W8A8) for CPUs, on fbgemm's int8 GEMM.

Weights are quantised once at load time: int8, symmetric, one scale per output
channel. Activations are quantised on the fly at every call by the kernel
(`quantized::linear_dynamic`: 7-bit, one scale per call). To make that one scale
as good as one per token, each row is first divided by its own max-abs and the
output row multiplied back (a linear map commutes with a per-row scale); and, as in
SmoothQuant, a per-input-channel factor c moves activation outliers into the weights
(calibrated once at load time from the channels' max |x| over a calibration pass):

    y[t] = s[t] * (W diag(c)) q(x[t] / c / s[t]) + b     s[t] = max_j |x[t, j] / c_j|
    c_j = max|x_j|^alpha / max|W_j|^(1 - alpha)          alpha = 0.5

Quality on SmolLM2-135M (benchmarks/quant_quality.py): weights alone in int8 leave
perplexity unchanged; 7-bit activations without smoothing cost +12%, with it ~+5%.

Why this kernel (measured on a 2-core AVX2 EPYC, torch 2.13, SmolLM2 shapes;
benchmarks/matmul_peak.py and benchmarks/README.md): fp32 `linear` peaks at
~150 GFLOP/s, bf16 at ~20 (emulated without AVX512-BF16), `torch._int_mm` at ~6
GOP/s and the weight-only `_weight_int8pack_mm` at ~4 (no AVX2 kernels), while
fbgemm's dynamic int8 linear reaches ~210-270 GOP/s batched and is 2-10x faster
than fp32 at one row (a quarter of the weight bytes).

What this module does NOT know: models or sharding. It swaps the matmul of
layers that expose `weight` (+ optional `bias`) and calls `set_int8(...)`.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from scalellm.protocol.errors import InvalidParameterError


def int_mm_fast() -> bool:
    """Whether torch._int_mm (oneDNN) has int8 units to run on: AMX or AVX512-VNNI. Measured on
    a 2-core AMX Xeon at SmolLM2's shapes: 1.6-2.5x the bf16 GEMM at 64 rows (2,500 GOP/s),
    1.2-2x at one row, but slower than bf16 on most shapes at 2,048 rows; on an AVX2-only
    EPYC ~6 GOP/s (fbgemm's dynamic linear is the one to use there)."""
    cpu = getattr(torch, "cpu", None)
    if os.environ.get("SCALELLM_INT8_FBGEMM"):
        return False
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_amx_tile_supported", "_is_vnni_supported")) \
        and bool(getattr(cpu, "_is_avx512_supported", lambda: False)())


def qlinear_fast() -> bool:
    """Whether oneDNN's int8 GEMM (`torch.ops.onednn.qlinear_pointwise`) is there and has int8
    units to run on (as int_mm_fast). Measured on the 2-core AMX Xeon at SmolLM2's shapes,
    4,096 rows: 1.7-1.8x the prepacked bf16 GEMM (qkv 0.79 vs 1.45 ms, down 1.48 vs 2.57).
    SCALELLM_INT8_ONEDNN=0 turns it off (then torch._int_mm with bf16 for large calls)."""
    if os.environ.get("SCALELLM_INT8_ONEDNN", "1") == "0" or not int_mm_fast():
        return False
    onednn = getattr(torch.ops, "onednn", None)
    if onednn is None or not (hasattr(onednn, "qlinear_pointwise") and hasattr(onednn, "qlinear_prepack")):
        return False
    return _qlinear_native()


def int8_rows_available() -> bool:
    """Whether the int8-rows chain (layers/int8_rows.py: every int8 linear's call on int8 codes
    with one scale a row) has an int8 GEMM here: our AMX kernel, oneDNN's int8 linear where it
    runs natively (`qlinear_fast`), else our VNNI GEMM or torch._int_mm (layers/int_mm_backend.py), on int8
    units (`int_mm_fast`). SCALELLM_INT8_ONEDNN=0 turns the chain off (then torch._int_mm for
    calls of up to INT8_MAX_ROWS rows and the bf16 weight above)."""
    return os.environ.get("SCALELLM_INT8_ONEDNN", "1") != "0" and int_mm_fast()


@functools.cache
def _qlinear_native() -> bool:
    """Whether oneDNN runs its int8 GEMM with a kernel of its own here, not its reference loop.

    NOTE: on a 2-core AMD EPYC (Zen 4: AVX-512 VNNI and BF16, no AMX) torch 2.13's
    `qlinear_prepack` picks a blocked weight layout that only oneDNN's reference
    implementation (`ref_int8`) then takes: 620 ms for a 64 x 576 x 1,536 call, against
    0.27 ms for torch._int_mm on the same machine. A 16 x 256 x 256 call takes 11-13 ms
    there and tens of microseconds where the kernel is native: the fastest of three calls
    against an absolute bound tells them apart. (A first version compared one call of each
    against torch._int_mm's: with the CPU busy, e.g. numba compiling beside a server's start,
    it said yes in 4 of 6 tries, and int8 served at minutes an answer.) A busy CPU can only
    make it say no where it is native, which costs speed, not correctness."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (256, 256), dtype=torch.int8, generator=g)
    codes = torch.randint(-127, 128, (16, 256), dtype=torch.int8, generator=g)
    try:
        packed = torch.ops.onednn.qlinear_prepack(q, [16, 256])
        args = (1.0, 0, packed, torch.ones(256), torch.zeros(256, dtype=torch.long), None, 1.0, 0,
                torch.float32, "none", [], "")
        torch.ops.onednn.qlinear_pointwise(codes, *args)  # (the first call builds the kernel)
        fastest = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            torch.ops.onednn.qlinear_pointwise(codes, *args)
            fastest = min(fastest, time.perf_counter() - t0)
    except RuntimeError:
        return False
    return fastest < 1.5e-3


def int8_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return hasattr(torch.ops.quantized, "linear_dynamic") and ("fbgemm" in engines or "x86" in engines)


def quantise_rows(x: torch.Tensor, inv_smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (times inv_smooth [K], if given) per row to int8 in torch ops: codes [M, K] and
    scales [M, 1] float32 (max |row| / 127, rounded half up: fused_cpu.quant_rows' definition)."""
    x32 = x.float() * inv_smooth if inv_smooth is not None else x.float()
    s = x32.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12) / 127.0
    return torch.floor(x32 / s + 0.5).clamp_(-127, 127).to(torch.int8), s


class Int8Backend(Protocol):
    """A GEMM for the int8-rows chain in place of oneDNN's (e.g. layers/amx_gemm.AmxInt8Backend):
    prepack one part (int8 [N, K], float32 scales [N]); codes [T, K] int8 times a prepacked
    part -> [T, N] in dtype (bf16 or float32) with the weight's scales applied."""

    def supports(self, q: torch.Tensor) -> bool: ...

    def prepack(self, q: torch.Tensor, scales: torch.Tensor) -> Any: ...

    def gemm(self, codes: torch.Tensor, packed: Any, dtype: torch.dtype) -> torch.Tensor: ...


# the row count oneDNN's int8 weights are prepacked for (measured at SmolLM2's shapes, 1-4,096
# rows: a hint of 64, 4,096 or none made no consistent difference)
_PREPACK_ROWS = 64


class Int8Weight:
    """A prepacked int8 weight [N, K] (per-channel symmetric scales) and its matmul."""

    __slots__ = ("packed", "out_features", "in_features", "nbytes", "inv_smooth", "q", "w_scales", "onednn",
                 "backend")

    def __init__(self, weight: torch.Tensor, act_amax: torch.Tensor | None = None, alpha: float = 0.5,
                 onednn_parts: int = 0, backend: Int8Backend | None = None) -> None:
        """onednn_parts > 0: the weight is held for the int8-rows GEMM (`gemm`), prepacked as
        that many equal row blocks (e.g. 2 for a [gate | up] pair: one output each): by
        `backend` where given and it takes every part's shape, else for oneDNN's int8 GEMM."""
        w = weight.detach().float()  # [N, K]
        self.inv_smooth: torch.Tensor | None = None
        if act_amax is not None:
            w_amax = w.abs().amax(dim=0).clamp(min=1e-5)  # [K]
            c = (act_amax.float().clamp(min=1e-5) ** alpha / w_amax ** (1 - alpha)).clamp(min=1e-5)  # [K]
            w = w * c
            self.inv_smooth = 1.0 / c
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [N]
        # NOTE: rounding by hand is 2.3x faster than torch.quantize_per_channel (0.34 vs 0.77 s
        # for SmolLM2's linears at start-up) and equal to it up to ties (82 of 134 M values).
        q = torch.round(w / scales.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        self.out_features, self.in_features = w.shape
        self.nbytes = w.numel() + 4 * w.shape[0]
        self.packed = None
        self.q: torch.Tensor | None = None  # [N, K] int8 for torch._int_mm (as its [K, N] transpose)
        self.w_scales: torch.Tensor | None = None  # [N] float32
        # the int8-rows GEMM, one entry per part: the backend's prepacked weight, or oneDNN's
        # (prepacked weight, its per-channel scales, zero points)
        self.onednn: list[Any] | None = None
        self.backend: Int8Backend | None = None
        if self.inv_smooth is not None:
            self.inv_smooth = self.inv_smooth.float().contiguous()
        if onednn_parts and backend is not None and all(backend.supports(qp) for qp in q.chunk(onednn_parts)):
            self.backend = backend
            self.onednn = [backend.prepack(qp.contiguous(), sp.contiguous())
                           for qp, sp in zip(q.chunk(onednn_parts), scales.float().chunk(onednn_parts), strict=True)]
            return
        if onednn_parts:
            self.onednn = []
            for qp, sp in zip(q.chunk(onednn_parts), scales.float().chunk(onednn_parts), strict=True):
                packed = torch.ops.onednn.qlinear_prepack(qp.contiguous(), [_PREPACK_ROWS, self.in_features])
                self.onednn.append((packed, sp.contiguous(), torch.zeros(qp.shape[0], dtype=torch.long)))
            return
        if int_mm_fast():
            # full 8-bit activations (no fbgemm 16-bit accumulation to protect)
            self.q, self.w_scales = q, scales.float().contiguous()
            return
        with warnings.catch_warnings():
            # NOTE: torch marks its quantized tensor types deprecated; fbgemm's kernels remain
            # the only fast int8 GEMM on AVX2 CPUs in torch. int8_available() guards the call.
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros(w.shape[0], dtype=torch.long),
                                                          0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)

    def gemm(self, codes: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """The int8-rows GEMM (onednn_parts weights): codes [T, K] int8 (activation scale 1)
        -> one [T, N / parts] output per part in `dtype`, each row still to be multiplied by
        its codes' scale."""
        assert self.onednn is not None
        if self.backend is not None:
            return [self.backend.gemm(codes, part, dtype) for part in self.onednn]
        return [torch.ops.onednn.qlinear_pointwise(codes, 1.0, 0, packed, w_scales, zeros, None, 1.0, 0, dtype,
                                                   "none", [], "")
                for packed, w_scales, zeros in self.onednn]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: [T, K] any float dtype -> [T, N] in x's dtype
        dtype = x.dtype
        if self.onednn is not None:  # torch ops around oneDNN's GEMM (layers/int8_rows fuses them)
            codes, s = quantise_rows(x.reshape(-1, self.in_features), self.inv_smooth)
            y = torch.cat(self.gemm(codes, torch.float32), dim=-1) * s
            if bias is not None:
                y.add_(bias)
            return y.view(*x.shape[:-1], self.out_features).to(dtype)
        x32 = x.float() * self.inv_smooth if self.inv_smooth is not None else x.float()
        s = x32.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)  # [T, 1]
        if self.q is not None:  # torch._int_mm, activations per row in 8 bits (torch ops; the
            # fused passes are layers/fused_cpu.int8_rows, which linears call once it is compiled)
            s = s / 127.0
            xq = torch.floor(x32 / s + 0.5).clamp_(-127, 127).to(torch.int8)
            acc = torch._int_mm(xq.reshape(-1, self.in_features), self.q.t()).view(*x.shape[:-1], self.out_features)
            y = acc.float() * s * self.w_scales
            if bias is not None:
                y.add_(bias)
            return y if dtype == torch.float32 else y.to(dtype)
        # NOTE: reduce_range=True (7-bit activations) keeps fbgemm's AVX2 16-bit pairwise
        # accumulation (vpmaddubsw) from saturating; the per-row scale keeps the precision.
        y = torch.ops.quantized.linear_dynamic(x32 / s, self.packed, True)
        y.mul_(s)
        if bias is not None:
            y.add_(bias)
        return y if dtype == torch.float32 else y.to(dtype)


def calibrate_act_amax(model: nn.Module, calibrate: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Run `calibrate` (forward passes over calibration tokens) with every int8-capable
    layer's input watched: module name -> max |input| per input channel ([K] float32)."""
    names = {m: name for name, m in model.named_modules() if getattr(m, "set_int8", None) is not None}
    amax: dict[str, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple) -> None:
        a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()  # [K]
        key = names[module]
        amax[key] = torch.maximum(amax[key], a) if key in amax else a

    hooks = [m.register_forward_pre_hook(record) for m in names]
    try:
        calibrate()
    finally:
        for h in hooks:
            h.remove()
    return amax


def quantize_int8(model: nn.Module, act_amax: dict[str, torch.Tensor] | None = None,
                  keep_weight: bool = False, onednn: bool = False) -> int:
    """Swap every layer that supports it (`set_int8(act_amax)`) to int8, smoothed by its
    calibrated max |input| per channel when `act_amax` (from `calibrate_act_amax`) has
    it. keep_weight: the layers keep their float weights too (for large calls). onednn: the
    weights are held for oneDNN's int8 GEMM (`qlinear_fast`; the layers' int8-rows chain).
    Returns the bytes freed."""
    if not int8_available():
        raise InvalidParameterError(
            "quantization", "int8 needs torch's fbgemm/x86 quantized engine, which this torch build lacks; "
            "run without --quantization")
    act_amax = act_amax or {}
    return sum(m.set_int8(act_amax.get(name), keep_weight, onednn=onednn) for name, m in model.named_modules()
               if getattr(m, "set_int8", None) is not None)
