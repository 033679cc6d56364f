"""Element access for numba kernels over float32 or bfloat16 tensors (imported lazily with numba).

numba has no bfloat16: a bfloat16 tensor reaches a kernel as its 16 raw bits (an
int16 view). `ld(a, r, c)` reads element [r, c] of a 2-D array as float32 whatever
the array holds (float32, bfloat16 bits, or int8 codes), or of the [N, K] matrix a 4-D array
of bfloat16 bits holds in the GEMMs' blocked layout; `st(a, r, c, v)` stores a float32
into it, rounding to nearest even for bfloat16 (as torch's float32 -> bfloat16 conversion
does); `rnd(a, v)` rounds v to
a's element type and returns it as float32 (for the double rounding torch's bfloat16
ops do between two operations). Each compiles to a few integer instructions that
vectorise; float32 arrays take the plain path.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable


@intrinsic
def bits_to_f32(typingctx, x):  # pragma: no cover - numba
    """uint32 -> float32, same bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def f32_to_bits(typingctx, x):  # pragma: no cover - numba
    """float32 -> uint32, same bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def prefetch(typingctx, a, r, c):  # pragma: no cover - numba
    """Hint the cache line holding a[r, c] (a 2-D array) into the caches (llvm.prefetch: read,
    high locality); no effect on results."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer2(context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
                                        strides=cgutils.unpack_tuple(builder, ary.strides), layout=aryty.layout,
                                        inds=[args[1], args[2]])
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        i32 = ir.IntType(32)
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(a, types.intp, types.intp), codegen


@register_jitable(inline="always")
def prefetch_row(a, r):  # pragma: no cover - numba (inlined)
    """Prefetch row r of a 2-D C-contiguous array, one cache line (64 bytes) at a time."""
    per_line = 64 // a.itemsize
    for c in range(0, a.shape[1], per_line):
        prefetch(a, r, c)


def ld(a, r, c):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


def st(a, r, c, v):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


def rnd(a, v):  # pragma: no cover - replaced by the overload inside numba
    raise NotImplementedError


@register_jitable(inline="always")
def _bf16_bits(v):  # pragma: no cover - numba (inlined)
    """float32 -> its bfloat16 rounding's 16 bits (round to nearest even; NaN stays NaN-ish)."""
    b = f32_to_bits(np.float32(v))
    return (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@register_jitable(inline="always")
def _widen(bits16):  # pragma: no cover - numba (inlined)
    return bits_to_f32(np.uint32(np.uint16(bits16)) << np.uint32(16))


@overload(ld, inline="always")
def _ld_impl(a, r, c):  # pragma: no cover - numba
    if a.ndim == 4:  # a [N, K] bfloat16 weight in the GEMMs' blocks [N/64, K/2, 64, 2] (layers/gemm_blocks.py)
        return lambda a, r, c: _widen(a[r >> 6, c >> 1, r & 63, c & 1])
    if a.dtype == types.float32:
        return lambda a, r, c: a[r, c]
    if a.dtype == types.int8:  # an 8-bit KV cache's codes (scaled by the caller)
        return lambda a, r, c: np.float32(a[r, c])
    return lambda a, r, c: _widen(a[r, c])


@overload(st, inline="always")
def _st_impl(a, r, c, v):  # pragma: no cover - numba
    if a.dtype == types.float32:
        def store(a, r, c, v):
            a[r, c] = v
        return store

    def store_bf16(a, r, c, v):
        a[r, c] = np.int16(np.uint16(_bf16_bits(v)))
    return store_bf16


@overload(rnd, inline="always")
def _rnd_impl(a, v):  # pragma: no cover - numba
    if a.dtype == types.float32:
        return lambda a, v: np.float32(v)
    return lambda a, v: bits_to_f32(_bf16_bits(v) << np.uint32(16))


@register_jitable(inline="always")
def fast_exp(x):  # pragma: no cover - numba (inlined)
    """exp(x) in float32 within ~2 ulp, as plain arithmetic that vectorises (numba's np.exp
    calls libm per element here: no SVML). Inputs below -87 give ~1e-38 instead of 0."""
    x = min(max(np.float32(x), np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693145751953125) - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * bits_to_f32(np.uint32(np.int32(n) + np.int32(127)) << np.uint32(23))


@register_jitable(inline="always")
def max_range(a, r, lo, hi, lanes):  # pragma: no cover - numba (inlined)
    """max of a[r, lo:hi] (float32; -inf if empty). lanes: a float32 scratch array of 16.

    NOTE: numba's max() over a loop is a scalar compare-and-select chain that LLVM does not
    vectorise (1.9 ms for 64 x 49,152); sixteen independent running maxima do (0.47 ms)."""
    for i in range(16):
        lanes[i] = -np.inf
    full = lo + (hi - lo) // 16 * 16
    for v0 in range(lo, full, 16):
        for i in range(16):
            x = a[r, v0 + i]
            lanes[i] = lanes[i] if lanes[i] > x else x
    best = np.float32(-np.inf)
    for i in range(16):
        best = best if best > lanes[i] else lanes[i]
    for v in range(full, hi):
        x = a[r, v]
        best = best if best > x else x
    return best
