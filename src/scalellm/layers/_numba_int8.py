"""numba kernels of `int8_cpu` (imported lazily with numba): the two element-wise passes
around an int8 GEMM (torch._int_mm) for W8A8 linears.

    quant_rows    q[t] = round(x[t] * inv_smooth / s[t]) as int8, s[t] = max_k |x[t, k] * inv_smooth[k]| / 127
    dequant_rows  out[t, n] = acc[t, n] * s[t] * w_scale[n] (+ bias[n]), in out's dtype

x and out are float32, or bfloat16 as int16 bits (`_numba_bits`); rows run in parallel.
"""

from __future__ import annotations

import numba
import numpy as np

from scalellm.layers._numba_bits import ld, st

_OPTS = {"parallel": True, "fastmath": True, "cache": True, "nogil": True, "error_model": "numpy"}


@numba.njit(**_OPTS)
def quant_rows(x, inv_smooth, has_smooth, q, scales):  # pragma: no cover - numba
    # x: [M, K]; inv_smooth: [K] float32 (read when has_smooth); q: [M, K] int8; scales: [M] float32
    num_rows, k_dim = x.shape
    for t in numba.prange(num_rows):
        row = np.empty(k_dim, dtype=np.float32)
        if has_smooth:  # NOTE: branches outside the loops, which then vectorise
            for k in range(k_dim):
                row[k] = ld(x, t, k) * inv_smooth[k]
        else:
            for k in range(k_dim):
                row[k] = ld(x, t, k)
        amax = np.float32(0.0)
        for k in range(k_dim):
            a = abs(row[k])
            amax = amax if amax > a else a
        s = max(amax, np.float32(1e-12)) / np.float32(127.0)
        inv = np.float32(1.0) / s
        for k in range(k_dim):
            # round half up: |row * inv| <= 127, so +128.5 is positive and truncation is floor
            # (np.floor is a libm call per element here; this vectorises)
            q[t, k] = np.int8(np.int32(row[k] * inv + np.float32(128.5)) - 128)
        scales[t] = s


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
