"""Rotary position embedding (the "rotate half" layout HF checkpoints use), with
the default, linear and llama3 frequency scalings. cos/sin are precomputed in
float32 for every position up to max_position."""

from __future__ import annotations

import math

import torch
from torch import nn

from scalellm.protocol.errors import UnsupportedModelError


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(rotary_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate the two halves of each head).

    One instance serves every layer of a model (`get_rope`), so the cos/sin rows of a
    step's positions are looked up once per step, not once per layer."""

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, base, scaling)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (positions, cos, sin)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last
        if last is not None and last[0] is positions:
            return last[1], last[2]
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        self._last = (positions, cos, sin)
        return cos, sin

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] (any heads: q and k side by side rotate in one call) -> rotated copy."""
        cos, sin = self._cos_sin(positions)
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        out = torch.cat((torch.addcmul(x1 * cos, x2, sin, value=-1.0), torch.addcmul(x2 * cos, x1, sin)), dim=-1)
        return out.to(x.dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotate(positions, q), self.rotate(positions, k)


_ROPES: dict[tuple, RotaryEmbedding] = {}


def get_rope(head_dim: int, max_position: int, base: float, scaling: dict | None = None) -> RotaryEmbedding:
    """The shared RotaryEmbedding for these settings (built once per process)."""
    key = (head_dim, max_position, base, repr(sorted((scaling or {}).items())), torch.get_default_device())
    rope = _ROPES.get(key)
    if rope is None:
        rope = _ROPES[key] = RotaryEmbedding(head_dim, max_position, base, scaling)
    return rope
