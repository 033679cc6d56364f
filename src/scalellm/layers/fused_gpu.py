"""Fused element-wise kernels for the GPU path (Triton), the counterpart of `fused_cpu`.

A decode step of a small batch is bound by kernel count, not bytes: measured on an H200
at Llama-3-8B shapes, a CUDA-graph decode step of one sequence took 6.45 ms against a
3.6 ms HBM floor, with ~35 kernels a layer (RMSNorm alone is eight torch ops). These
kernels make each of those chains one pass:

- `rms_norm`: residual add + RMSNorm (+ weight) in one row pass; returns (normed, sum);
- `rope_write_kv`: rotary on q and k in place in the QKV projection's rows, and K/V
  written to the paged cache, one program per token;
- `silu_and_mul`: SiLU(gate) * up.

(The fp8 linears' per-row activation quantisation is one such kernel too, in quant/fp8.py.)
Each rounds where the torch path rounds (float32 math, one rounding to the activation
dtype at the same points), so the two paths agree to rounding order. Every kernel
runs one program per row and walks the row in chunks, so any width works.
`TRITON_INTERPRET=1` runs them on CPU tensors (how CI checks them).
"""

from __future__ import annotations

import torch

from scalellm.layers import paged_attention_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

CHUNK = 1024
ENABLED = True  # benchmarks switch the kernels off to measure what they save


def supports(x: torch.Tensor) -> bool:
    """Whether these kernels run for x: Triton is installed, x is on a GPU (or Triton
    interprets) and is a 16-bit float tensor."""
    return (ENABLED and triton is not None and (x.is_cuda or paged_attention_triton.interpreted())
            and x.dtype in (torch.bfloat16, torch.float16))


if triton is not None:

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

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             output_float32: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, E] (rows contiguous) -> norm(x) or, with a residual, (norm(x + residual), x + residual)."""
    t, n = x.shape
    out = torch.empty(t, n, dtype=torch.float32 if output_float32 else x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else x
    if t:
        res = residual if residual is not None else x
        _rms_norm_kernel[(t,)](x, res, weight, out, total, n, eps, x.stride(0), res.stride(0), out.stride(0),
                               total.stride(0), HAS_RES=residual is not None, OUT_F32=output_float32,
                               CH=min(CHUNK, triton.next_power_of_2(n)), num_warps=4)
    return out if residual is None else (out, total)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> SiLU(gate) * up [T, I]."""
    t, n2 = x.shape
    n = n2 // 2
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t:
        _silu_mul_kernel[(t,)](x, out, n, x.stride(0), out.stride(0), CH=min(CHUNK, triton.next_power_of_2(n)),
                               num_warps=4)
    return out


def rope_write_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor, k_flat: torch.Tensor,
                  v_flat: torch.Tensor) -> None:
    """qkv [T, (H + 2 Hkv) D]: rotate q and k in place (neox halves; cos/sin [P, D/2] float32)
    and write K/V to the cache rows k_flat/v_flat [N*S, Hkv, D] at slot_mapping [T]."""
    t = qkv.shape[0]
    if not t:
        return
    assert qkv.stride(1) == 1 and k_flat.is_contiguous() and v_flat.is_contiguous() and cos.is_contiguous()
    hp = triton.next_power_of_2(num_heads + num_kv_heads)
    _rope_kv_kernel[(t,)](qkv, positions, cos, sin, slot_mapping, k_flat, v_flat, qkv.stride(0), cos.stride(0),
                          k_flat.stride(0), v_flat.stride(0), H=num_heads, HKV=num_kv_heads, D=head_dim, HP=hp,
                          num_warps=4)
