"""4-bit weights with a scale and a zero per group of 32 input channels, for small-batch
CPU GEMMs (torch's `_weight_int4pack_mm_for_cpu`, bf16 activations).

A decode step of one or a few sequences reads every weight once for a handful of rows:
its linears are bound by memory, and four bits a weight read a quarter of bf16's bytes.
Larger calls (prefill, batched decode) stay on the bf16 weight, where oneDNN's AMX GEMM
wins (the int4 kernel is ~5x slower than a prepacked bf16 weight at 64 rows).

The codes are a round-to-nearest, min/max quantisation of the bf16 weight, group by
group: w ~= (q - 8) * scale + zero, q in 0..15, scale = (max - min) / 15, zero = min +
8 * scale (the kernel's convention). For a model loaded from a Q4_1 GGUF, whose weights
are 4-bit groups of 32 to begin with (each block's minimum and maximum are its codes 0 and
15), this recovers the file's codes: the values differ from the bf16 weight by the rounding
of scale and zero to bf16 (~0.35% of a group's range, a twentieth of a quantisation step,
on SmolLM2's Q4_1 file). Other weights (bf16 checkpoints; Q4_0, whose symmetric blocks
need not use both end codes) are quantised anew: within half a step of their values.
"""

from __future__ import annotations

import functools

import torch

GROUP_SIZE = 32


@functools.cache
def int4_cpu_available() -> bool:
    """Whether this torch has the CPU int4 GEMM (`_weight_int4pack_mm_for_cpu`) and it runs."""
    try:
        w = Int4Weight(torch.ones(16, GROUP_SIZE, dtype=torch.bfloat16))
        y = w.mm(torch.ones(1, GROUP_SIZE, dtype=torch.bfloat16))
        return bool(abs(float(y[0, 0]) - GROUP_SIZE) < 0.5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def supports(weight: torch.Tensor) -> bool:
    """A [N, K] bf16 CPU weight the int4 kernel takes (whole groups along K, N in 16s)."""
    return (weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and weight.shape[1] % GROUP_SIZE == 0 and weight.shape[0] % 16 == 0)


class Int4Weight:
    """A [N, K] bf16 weight as 4-bit codes (packed for the CPU kernel) with a bf16 scale and
    zero per group of GROUP_SIZE input channels."""

    def __init__(self, weight: torch.Tensor) -> None:
        n, k = weight.shape
        groups = weight.detach().float().view(n, k // GROUP_SIZE, GROUP_SIZE)
        lo = groups.amin(-1, keepdim=True)
        hi = groups.amax(-1, keepdim=True)
        scale = (hi - lo) / 15.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: all codes 0
        codes = ((groups - lo) / scale).round_().clamp_(0, 15).to(torch.int32).view(n, k)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)  # [N, K/2] uint8
        zero = lo + 8.0 * scale
        # [K/G, N, 2]: (scale, zero) per group and output channel, in the activations' dtype
        self.scales_zeros = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], dim=-1) \
            .to(weight.dtype).contiguous()

    @property
    def nbytes(self) -> int:
        return (self.packed.numel() * self.packed.element_size()
                + self.scales_zeros.numel() * self.scales_zeros.element_size())

    def dequantize(self) -> torch.Tensor:
        """The [N, K] float32 values the kernel multiplies by (for checks)."""
        k = self.packed.shape[1] * 2
        eye = torch.eye(k, dtype=self.scales_zeros.dtype)
        return self.mm(eye).float().t().contiguous()

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (bf16) @ W.T -> [M, N] bf16."""
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_zeros)
