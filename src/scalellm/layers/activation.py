"""Gated activations over a merged [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.layers import fused_cpu, fused_gpu


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_cpu.supports(x) and x.dim() == 2 and x.is_contiguous():
            return fused_cpu.silu_and_mul(x)  # one pass (numba) instead of three ops
        if fused_gpu.supports(x) and x.dim() == 2 and x.stride(1) == 1:
            return fused_gpu.silu_and_mul(x)  # one pass (Triton)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]  # [T, 2I] -> [T, I]
