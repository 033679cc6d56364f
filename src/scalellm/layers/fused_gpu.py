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

CHUNK = 1024
ENABLED = True  # benchmarks switch the kernels off to measure what they save


def supports(x: torch.Tensor) -> bool:
    """Whether these kernels run for x: Triton is installed, x is on a GPU (or Triton
    interprets) and is a 16-bit float tensor."""
    return (ENABLED and (x.is_cuda or paged_attention_triton.interpreted())
            and x.dtype in (torch.bfloat16, torch.float16) and paged_attention_triton.available())


def _k():  # the kernels module (triton is imported on first use)
    from scalellm.layers import _triton_fused

    return _triton_fused


_pow2 = paged_attention_triton.next_power_of_2


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             output_float32: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, E] (rows contiguous) -> norm(x) or, with a residual, (norm(x + residual), x + residual)."""
    t, n = x.shape
    out = torch.empty(t, n, dtype=torch.float32 if output_float32 else x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else x
    if t:
        res = residual if residual is not None else x
        _k()._rms_norm_kernel[(t,)](x, res, weight, out, total, n, eps, x.stride(0), res.stride(0), out.stride(0),
                               total.stride(0), HAS_RES=residual is not None, OUT_F32=output_float32,
                               CH=min(CHUNK, _pow2(n)), num_warps=4)
    return out if residual is None else (out, total)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> SiLU(gate) * up [T, I]."""
    t, n2 = x.shape
    n = n2 // 2
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t:
        _k()._silu_mul_kernel[(t,)](x, out, n, x.stride(0), out.stride(0), CH=min(CHUNK, _pow2(n)),
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
    hp = _pow2(num_heads + num_kv_heads)
    _k()._rope_kv_kernel[(t,)](qkv, positions, cos, sin, slot_mapping, k_flat, v_flat, qkv.stride(0), cos.stride(0),
                          k_flat.stride(0), v_flat.stride(0), H=num_heads, HKV=num_kv_heads, D=head_dim, HP=hp,
                          num_warps=4)
