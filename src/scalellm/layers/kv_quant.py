"""The 8-bit KV cache's number format, in torch (the CPU kernels write and read the same).

Each token's K (and V) row of one KV head, D values, is stored as D int8 codes and one
float32 scale: scale = max|x| / 127 (1 for an all-zero row), code = round_half_even(x /
scale), x ~= code * scale. A layer's cache is then [2, N, S, Hkv, D] int8 plus its scales
[2, N, S, Hkv] float32: (D + 4) bytes a row instead of 2 D in bfloat16 (68 vs 128 at D=64).
The error is at most half a step, max|x| / 254 per value.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4  # one float32 scale per (token, KV head) row


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] (any float dtype) -> (codes [..., D] int8, scales [...] float32)."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(x32 / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D] int8, scales [...] float32 -> [..., D] in `dtype`."""
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)


def gather(flat: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `slots` of a layer's flat K or V cache [N*S, Hkv, D] (with its scales [N*S, Hkv]
    when it holds codes) -> [len(slots), Hkv, D] in `dtype`."""
    rows = flat.index_select(0, slots)
    return rows if scales is None else dequantize(rows, scales.index_select(0, slots), dtype)
