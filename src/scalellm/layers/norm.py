"""RMSNorm, computed in float32 like the reference implementations, with an
optional fused residual add: `norm(x, residual)` returns (normed, x + residual).
On CPU the whole chain is one numba pass (`fused_cpu`) once its kernels are compiled,
on GPU one Triton pass (`fused_gpu`)."""

from __future__ import annotations

import torch
from torch import nn

from scalellm.layers import fused_cpu, fused_gpu
from scalellm.layers.int8_rows import Int8Rows, ScaledRows
from scalellm.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    def __init__(
        self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None, output_float32: bool = False
    ) -> None:
        super().__init__()
        self.eps = eps
        self.output_float32 = output_float32  # the final norm feeds the LM head in float32
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]
        # set by a model's int8-rows wiring (layers/int8_rows.py): the output goes to an int8
        # linear as int8 rows, smoothed by this (or None) first
        self.int8_out = False
        self.int8_smooth: torch.Tensor | None = None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.output_float32:
            return self.weight.float() * x32
        return self.weight * x32.to(dtype)

    def forward(
        self, x: torch.Tensor | ScaledRows, residual: torch.Tensor | None = None
    ) -> torch.Tensor | Int8Rows | tuple[torch.Tensor | Int8Rows, torch.Tensor]:
        """x: [T, E], or an int8 linear's output with its row scales still to apply (ScaledRows).
        Wired to an int8 linear (int8_out), the normed rows come out as int8 rows."""
        scaled = x if isinstance(x, ScaledRows) else None
        data = scaled.data if scaled is not None else x
        assert isinstance(data, torch.Tensor)
        if (self.int8_out and fused_cpu.supports(data) and data.dim() == 2 and data.is_contiguous()
                and self.weight.dtype == data.dtype
                and (residual is None or (residual.dtype == data.dtype and residual.is_contiguous()))):
            codes, scales, total = fused_cpu.norm_quant(data, scaled.scales if scaled is not None else None, residual,
                                                        self.weight, self.eps, self.int8_smooth)
            return (Int8Rows(codes, scales), total) if residual is not None else Int8Rows(codes, scales)
        if scaled is not None:
            x = scaled.dense()
        assert isinstance(x, torch.Tensor)
        if (fused_cpu.supports(x) and x.dim() == 2 and x.is_contiguous() and self.weight.dtype == x.dtype
                and (residual is None or (residual.dtype == x.dtype and residual.is_contiguous()))):
            return fused_cpu.rms_norm(x, self.weight, self.eps, residual, self.output_float32)
        if (fused_gpu.supports(x) and x.dim() == 2 and x.stride(1) == 1 and self.weight.dtype == x.dtype
                and (residual is None or (residual.dtype == x.dtype and residual.stride(1) == 1))):
            return fused_gpu.rms_norm(x, self.weight, self.eps, residual, self.output_float32)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
