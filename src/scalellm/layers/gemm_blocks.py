"""The weight layout of our non-AMX GEMMs (csrc/gemm_blocks.h; bf16_gemm.py, int_mm_backend.py):
blocks of BLOCK output channels; in a block, each step of K holds every channel's `per_step`
consecutive values together (a pair of bf16, a quad of int8: 4 bytes a channel), so that a step
is 4 registers of 16 channels. N is padded with zero channels to a whole number of blocks."""

from __future__ import annotations

import torch

BLOCK = 64  # output channels of a block (csrc/gemm_blocks.h's NR)


def pack_blocks(weight: torch.Tensor, per_step: int) -> torch.Tensor:
    """[N, K] (K a multiple of per_step) -> [Np / BLOCK, K / per_step, BLOCK, per_step], Np = N
    rounded up to BLOCK, the padding channels zero."""
    n, k = weight.shape
    padded = -(-n // BLOCK) * BLOCK
    full = torch.zeros(padded, k, dtype=weight.dtype)
    full[:n] = weight.detach()
    return full.view(padded // BLOCK, BLOCK, k // per_step, per_step).permute(0, 2, 1, 3).contiguous()
