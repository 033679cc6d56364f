"""numba kernels of `fused_cpu` for W8A8 linears (imported lazily with numba).

    quant_rows    q[t] = round_half_up(x[t] * inv_smooth / s[t]) as int8, s[t] = max_k |x[t, k] *
                  inv_smooth[k]| / 127 (the max over the float bits as integers, which vectorises:
                  0.25 ms at 4,096 x 576 where a float compare chain and a per-row buffer took 1.3-1.5)
    dequant_rows  out[t, n] = acc[t, n] * s[t] * w_scale[n] (+ bias[n]), in out's dtype
                  (around torch._int_mm, after quant_rows)

The int8-rows chain (layers/int8_rows.py, oneDNN's int8 GEMM): the kernel that makes a
linear's input quantises it, and the one that reads its output applies the row scale:
    norm_quant       [row-scaled x + residual] -> RMSNorm -> int8 rows
    silu_mul_quant   row-scaled [gate, up] -> silu(gate) * up -> int8 rows
    scale_rows       out[t] = x[t] * s[t] (+ bias)

x and out are float32, or bfloat16 as int16 bits (`_numba_bits`); rows run in parallel.
"""

from __future__ import annotations

import numba
import numpy as np

from numba.extending import register_jitable

from scalellm.layers._numba_bits import bits_to_f32, f32_to_bits, fast_exp, ld, rnd, st

_OPTS = {"parallel": True, "fastmath": True, "cache": True, "nogil": True, "error_model": "numpy"}


@numba.njit(**_OPTS)
def dequant_rows(acc, scales, w_scales, bias, has_bias, out):  # pragma: no cover - numba
    # acc: [M, N] int32; scales: [M]; w_scales: [N] float32; bias: [1, N] (out's dtype); out: [M, N]
    num_rows, n_dim = acc.shape
    for t in numba.prange(num_rows):
        s = scales[t]
        for n in range(n_dim):
            v = np.float32(acc[t, n]) * (s * w_scales[n])
            if has_bias:
                v += ld(bias, 0, n)
            st(out, t, n, v)


@register_jitable(inline="always")
def _code(v, inv):  # pragma: no cover - numba (inlined)
    # round half up: |v * inv| <= 127, so +128.5 is positive and truncation is floor
    return np.int8(np.int32(v * inv + np.float32(128.5)) - 128)


@register_jitable(inline="always")
def _abs_bits(v):  # pragma: no cover - numba (inlined)
    # |v|'s float32 bits as an integer: for non-negative floats integer order is value order,
    # and an integer max reduction vectorises where a float compare-and-select chain does not
    return np.int32(f32_to_bits(np.float32(v)) & np.uint32(0x7FFFFFFF))


@register_jitable(inline="always")
def _max_bits(top, v):  # pragma: no cover - numba (inlined)
    # a running max|v| as float bits, kept inside the loop that makes the row: one pass fewer over
    # it (SiLU-mul + quantise at 4,096 x 1,536: 1.47 -> 1.30 ms). (max(), not a conditional
    # expression: inlined into a loop, that made numba warn of a phi variable out of scope)
    return max(top, _abs_bits(v))


@register_jitable(inline="always")
def _codes_from_max(row, n, codes, t, scales, top):  # pragma: no cover - numba (inlined)
    # row[:n] (float32) whose max |.| has the bits `top` -> codes[t, :n], one scale max / 127 in scales[t]
    amax = bits_to_f32(np.uint32(top))
    sc = max(amax, np.float32(1e-12)) / np.float32(127.0)
    inv = np.float32(1.0) / sc
    for i in range(n):
        codes[t, i] = _code(row[i], inv)
    scales[t] = sc


@numba.njit(**_OPTS)
def norm_quant(x, x_scales, has_x_scales, residual, has_residual, weight, inv_smooth, has_smooth, eps,
               sum_out, codes, scales, scratch):  # pragma: no cover - numba
    # RMSNorm whose output is int8 rows (one scale each) for an int8 linear:
    #   v = x[t] * x_scales[t] (a row-scaled linear output; 1 without has_x_scales) [+ residual[t]],
    #   rounded to sum_out's dtype and kept there (the residual stream);
    #   y = weight * round(norm(v)) [* inv_smooth]; codes[t] = round(y / scales[t]), scales[t] = max|y| / 127.
    # x, residual, sum_out: [T, E] (one dtype); weight: [1, E]; inv_smooth: [E] float32;
    # codes: [T, E] int8; scales: [T] float32; scratch: [threads, E] float32 (a row per thread).
    num_tokens, hidden = x.shape
    for t in numba.prange(num_tokens):
        row = scratch[numba.get_thread_id()]
        xs = x_scales[t] if has_x_scales else np.float32(1.0)
        ss = np.float32(0.0)
        if has_residual:
            for e in range(hidden):
                s = rnd(sum_out, rnd(sum_out, ld(x, t, e) * xs) + ld(residual, t, e))
                st(sum_out, t, e, s)
                ss += s * s
        else:
            for e in range(hidden):
                s = rnd(sum_out, ld(x, t, e) * xs)
                st(sum_out, t, e, s)
                ss += s * s
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(hidden) + eps)
        top = np.int32(0)
        if has_smooth:
            for e in range(hidden):
                y = ld(weight, 0, e) * rnd(sum_out, ld(sum_out, t, e) * inv) * inv_smooth[e]
                row[e] = y
                top = _max_bits(top, y)
        else:
            for e in range(hidden):
                y = ld(weight, 0, e) * rnd(sum_out, ld(sum_out, t, e) * inv)
                row[e] = y
                top = _max_bits(top, y)
        _codes_from_max(row, hidden, codes, t, scales, top)


@numba.njit(**_OPTS)
def silu_mul_quant(gate, up, row_scales, inv_smooth, has_smooth, codes, scales, scratch):  # pragma: no cover
    # SiLU-and-mul of row-scaled bfloat16 GEMM outputs (true gate = gate[t] * row_scales[t], the
    # same for up), as int8 rows for the next int8 linear:
    #   h = silu(g) * u [* inv_smooth] in float32; codes[t] = round(h / scales[t]), scales[t] = max|h| / 127
    # gate, up: [T, I] (float32 or bfloat16 bits); codes: [T, I] int8; scales: [T]; scratch: [threads, I]
    # float32. NOTE: at 4,096 x 1,536 a bfloat16 SiLU table (one gather per element, as silu_and_mul_table)
    # took 4.5 ms, the vectorised exponential 2.2 ms.
    num_tokens, inter = gate.shape
    for t in numba.prange(num_tokens):
        row = scratch[numba.get_thread_id()]
        rs = row_scales[t]
        top = np.int32(0)
        if has_smooth:  # (branches outside the loops, which then vectorise)
            for i in range(inter):
                g = ld(gate, t, i) * rs
                h = g / (np.float32(1.0) + fast_exp(-g)) * (ld(up, t, i) * (rs * inv_smooth[i]))
                row[i] = h
                top = _max_bits(top, h)
        else:
            for i in range(inter):
                g = ld(gate, t, i) * rs
                h = g / (np.float32(1.0) + fast_exp(-g)) * (ld(up, t, i) * rs)
                row[i] = h
                top = _max_bits(top, h)
        _codes_from_max(row, inter, codes, t, scales, top)


@numba.njit(**_OPTS)
def quant_rows(x, inv_smooth, has_smooth, q, scales, scratch):  # pragma: no cover - numba
    # x: [M, K]; inv_smooth: [K] float32 (read when has_smooth); q: [M, K] int8; scales: [M] float32;
    # scratch: [threads, K] float32 (a row per thread: no per-row allocation)
    num_rows, k_dim = x.shape
    for t in numba.prange(num_rows):
        row = scratch[numba.get_thread_id()]
        top = np.int32(0)
        if has_smooth:
            for k in range(k_dim):
                y = ld(x, t, k) * inv_smooth[k]
                row[k] = y
                top = _max_bits(top, y)
        else:
            for k in range(k_dim):
                y = ld(x, t, k)
                row[k] = y
                top = _max_bits(top, y)
        _codes_from_max(row, k_dim, q, t, scales, top)


@numba.njit(**_OPTS)
def scale_rows(x, row_scales, bias, has_bias, out):  # pragma: no cover - numba
    # out[t] = x[t] * row_scales[t] (+ bias), rounded to out's dtype; x, out: [T, N]; bias: [1, N]
    num_rows, n_dim = x.shape
    for t in numba.prange(num_rows):
        s = row_scales[t]
        if has_bias:
            for n in range(n_dim):
                st(out, t, n, rnd(out, ld(x, t, n) * s) + ld(bias, 0, n))
        else:
            for n in range(n_dim):
                st(out, t, n, ld(x, t, n) * s)
