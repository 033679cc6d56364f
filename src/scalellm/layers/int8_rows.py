"""Activations between int8 linears (W8A8 on oneDNN's int8 GEMM), carried with their row scales.

oneDNN's int8 GEMM (`torch.ops.onednn.qlinear_pointwise`, AMX) takes one activation scale
per call, while our activations are quantised per row (each token's own max |x| / 127:
per-tensor scales lose the small rows to the outliers of the large). So the GEMM runs on the
codes with scale 1 and its output's row t is still to be multiplied by the input's scale
s[t]. Standalone passes for that and for quantising each input cost about what the int8
GEMM saves over bf16 (benchmarks/README.md, session 11); here the kernels that already
touch each activation do it (numba, fused_cpu):

    RMSNorm ──Int8Rows──► qkv ──ScaledRows──► rotary + KV write (applies s) ─► attention
    attention out ──(quantised)──► o_proj ──ScaledRows──► residual add + RMSNorm (applies s)
    RMSNorm ──Int8Rows──► gate, up ──ScaledRows──► SiLU-mul (applies s, quantises) ──Int8Rows──► down
    down ──ScaledRows──► the next layer's residual add + RMSNorm

Which producer hands which consumer these (instead of plain tensors) is wired once, after
quantisation, by flags on the layers (`rows_out` on linears, `int8_out` on RMSNorm,
`silu_rows_out` on a [gate | up] linear; see LlamaForCausalLM.link_int8_rows); a consumer
that gets ScaledRows where it has no fused path calls `dense()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scalellm.layers import fused_cpu
from scalellm.quant.int8 import quantise_rows


@dataclass(slots=True, frozen=True)
class Int8Rows:
    """int8 codes [T, K] and one float32 scale a row [T]: row t is codes[t] * scales[t]."""

    codes: torch.Tensor
    scales: torch.Tensor


@dataclass(slots=True, frozen=True)
class ScaledRows:
    """An int8 GEMM's output [T, N] (x's dtype) whose row t is still to be multiplied by
    scales[t] [T] float32."""

    data: torch.Tensor
    scales: torch.Tensor

    def dense(self, bias: torch.Tensor | None = None) -> torch.Tensor:
        """data * scales[:, None] (+ bias), in data's dtype."""
        x = self.data
        if x.dim() == 2 and x.is_contiguous() and fused_cpu.supports(x):
            return fused_cpu.scale_rows(x, self.scales, bias)
        y = (x.float() * self.scales.unsqueeze(1)).to(x.dtype)
        return y + bias if bias is not None else y


def quantise(x: torch.Tensor, inv_smooth: torch.Tensor | None) -> Int8Rows:
    """x [M, K] (times inv_smooth [K], if given) as int8 rows: one pass with the numba kernels,
    torch ops until they are compiled."""
    if x.dim() == 2 and x.is_contiguous() and fused_cpu.supports(x):
        return Int8Rows(*fused_cpu.quant_rows(x, inv_smooth))
    codes, scales = quantise_rows(x, inv_smooth)
    return Int8Rows(codes, scales.squeeze(1).contiguous())
