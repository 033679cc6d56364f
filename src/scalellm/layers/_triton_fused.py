"""The Triton kernels of `fused_gpu` (imported only when one runs; see there)."""

import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, OUT, SUM, n, eps, stride_x, stride_r, stride_o, stride_s,
                     HAS_RES: tl.constexpr, OUT_F32: tl.constexpr, CH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([CH], tl.float32)
    for c0 in range(0, n, CH):
        cols = c0 + tl.arange(0, CH)
        m = cols < n
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=m, other=0.0).to(tl.float32))
            x = x.to(X.dtype.element_ty)  # the sum is rounded to the activation dtype, as torch's add
            tl.store(SUM + row * stride_s + cols, x, mask=m)
        xf = x.to(tl.float32)
        acc += xf * xf
    r = 1.0 / tl.sqrt(tl.sum(acc, 0) / n + eps)
    for c0 in range(0, n, CH):
        cols = c0 + tl.arange(0, CH)
        m = cols < n
        if HAS_RES:
            x = tl.load(SUM + row * stride_s + cols, mask=m, other=0.0).to(tl.float32)
        else:
            x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        if OUT_F32:
            y = w * (x * r)
        else:
            y = (x * r).to(X.dtype.element_ty).to(tl.float32) * w
        tl.store(OUT + row * stride_o + cols, y.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _silu_mul_kernel(X, OUT, n, stride_x, stride_o, CH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    for c0 in range(0, n, CH):
        cols = c0 + tl.arange(0, CH)
        m = cols < n
        g = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(X + row * stride_x + n + cols, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + row * stride_o + cols, (s * u).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _rope_kv_kernel(QKV, POS, COS, SIN, SLOTS, KC, VC, stride_t, stride_cos, stride_kslot, stride_vslot,
                    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = D // 2
    pos = tl.load(POS + t)
    j = tl.arange(0, half)
    cos = tl.load(COS + pos * stride_cos + j)[None, :]  # float32 [1, D/2]
    sin = tl.load(SIN + pos * stride_cos + j)[None, :]
    h = tl.arange(0, HP)
    hm = (h < H + HKV)[:, None]  # q heads, then k heads: all rotate the same way
    base = QKV + t * stride_t + h[:, None] * D
    x1 = tl.load(base + j[None, :], mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(base + half + j[None, :], mask=hm, other=0.0).to(tl.float32)
    o1 = (x1 * cos - x2 * sin).to(QKV.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(QKV.dtype.element_ty)
    tl.store(base + j[None, :], o1, mask=hm)
    tl.store(base + half + j[None, :], o2, mask=hm)
    slot = tl.load(SLOTS + t)
    kh = h - H
    km = ((h >= H) & (h < H + HKV))[:, None]
    kdst = KC + slot * stride_kslot + kh[:, None] * D
    tl.store(kdst + j[None, :], o1.to(KC.dtype.element_ty), mask=km)
    tl.store(kdst + half + j[None, :], o2.to(KC.dtype.element_ty), mask=km)
    d = tl.arange(0, D)
    vh = tl.arange(0, HP)
    vm = (vh < HKV)[:, None]
    v = tl.load(QKV + t * stride_t + (H + HKV) * D + vh[:, None] * D + d[None, :], mask=vm, other=0.0)
    tl.store(VC + slot * stride_vslot + vh[:, None] * D + d[None, :], v.to(VC.dtype.element_ty), mask=vm)
