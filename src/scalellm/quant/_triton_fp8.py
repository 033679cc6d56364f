"""The Triton kernel of `fp8` (imported only when it runs; see there)."""

import triton
import triton.language as tl


@triton.jit
def _quant_fp8_kernel(X, Q, S, n, stride_x, stride_q, FMAX: tl.constexpr, CH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([CH], tl.float32)
    for c0 in range(0, n, CH):
        cols = c0 + tl.arange(0, CH)
        x = tl.load(X + row * stride_x + cols, mask=cols < n, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0), 1e-12) / FMAX
    tl.store(S + row, scale)
    for c0 in range(0, n, CH):
        cols = c0 + tl.arange(0, CH)
        m = cols < n
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FMAX), FMAX)
        tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=m)
