"""Dequantize GGUF (ggml) tensor data to float32 torch tensors.

What this module knows: the byte layout of the ggml block types listed in
`SUPPORTED_TYPES`, and how to turn a buffer of such blocks into float32 values with
whole-tensor torch ops (views, shifts, masks) -- no Python loop over blocks. The result
is bit-identical to the reference numpy code in `gguf.quants` (same float32 operations in
the same order).

What it does not know: file parsing, tensor names, the meaning of a tensor, or any
model-specific permutation (see `scalellm.loader.gguf_loader`). The i-quants (IQ*),
ternary (TQ*), Q2_K / Q3_K / Q8_1 / Q8_K and the FP4 formats are not supported: asking
for them raises `UnsupportedModelError`.

Shapes: ggml lists dimensions fastest-first (`ne[0]` = the row length). `dequantize`
takes and returns the *torch* (row-major) shape, i.e. the reversed `ne`, so a GGUF
matrix with ne = [in_features, out_features] comes back as (out_features, in_features),
the same as an `nn.Linear` weight. Blocks never straddle rows: every row length is a
multiple of the block size.

Block layouts (little-endian; `f16` = IEEE half; offsets in bytes; every block holds
`block_size` consecutive values of one row; q = the stored integer):

    F32  (1 value,   4 B)  [f32]
    F16  (1 value,   2 B)  [f16]
    BF16 (1 value,   2 B)  [bf16]  = high half of an f32

    Q8_0 (32 values, 34 B)       x = d * q,  q int8
        0      2                                   34
        +------+-----------------------------------+
        | d f16|  qs[32] int8                      |
        +------+-----------------------------------+

    Q4_0 (32 values, 18 B)       x = d * (q - 8)
        0      2                  18
        +------+------------------+
        | d f16|  qs[16]          |   value j    = qs[j] & 0x0F   (j < 16)
        +------+------------------+   value j+16 = qs[j] >> 4

    Q4_1 (32 values, 20 B)       x = d * q + m
        0      2      4                  20
        +------+------+------------------+
        | d f16| m f16|  qs[16] (as Q4_0)|
        +------+------+------------------+

    Q5_0 (32 values, 22 B)       x = d * (q - 16),  q = nibble | (bit_j(qh) << 4)
        0      2            6                  22
        +------+------------+------------------+
        | d f16| qh u32 LE  |  qs[16] (as Q4_0)|   bit j of qh = 5th bit of value j
        +------+------------+------------------+

    Q5_1 (32 values, 24 B)       x = d * q + m,  q as Q5_0
        0      2      4            8                  24
        +------+------+------------+------------------+
        | d f16| m f16| qh u32 LE  |  qs[16]          |
        +------+------+------------+------------------+

    K-quants: a 256-value super-block of sub-blocks.

    Q4_K (256 values = 8 x 32, 144 B)   x = (d*sc[s]) * q - (dmin*mn[s])
        0      2       4            16                              144
        +------+-------+------------+-------------------------------+
        | d f16|dmin f16| scales[12]|  qs[128]                      |
        +------+-------+------------+-------------------------------+
        scales: 8 six-bit scales sc[] and 8 six-bit mins mn[], packed:
            byte 0..3 : sc[0..3] (low 6 bits), high 2 bits -> sc[4..7] bits 4-5
            byte 4..7 : mn[0..3] (low 6 bits), high 2 bits -> mn[4..7] bits 4-5
            byte 8..11: low nibble = sc[4..7] bits 0-3, high nibble = mn[4..7] bits 0-3
        qs: 4 chunks of 32 bytes; chunk c holds sub-block 2c in its low nibbles and
            sub-block 2c+1 in its high nibbles.

    Q5_K (256 values = 8 x 32, 176 B)   as Q4_K, q = nibble | (hbit << 4)
        0      2       4            16              48                  176
        +------+-------+------------+---------------+-------------------+
        | d f16|dmin f16| scales[12]|  qh[32]       |  qs[128]          |
        +------+-------+------------+---------------+-------------------+
        hbit of value j (0..31) in sub-block s = bit s of qh[j].

    Q6_K (256 values = 16 x 16, 210 B)   x = (d*sc[s]) * (q - 32),  sc int8
        0                  128               192          208    210
        +------------------+-----------------+------------+------+
        |  ql[128]         |  qh[64]         | sc[16] i8  | d f16|
        +------------------+-----------------+------------+------+
        Two halves of 128 values (h = 0, 1), each using ql[64h:64h+64], qh[32h:32h+32]:
            value 128h + 64t + i (t = 0, 1; i < 64) low 4 bits  = ql[64h+i] >> 4t
            value 128h + 32k + i (k = 0..3; i < 32) high 2 bits = (qh[32h+i] >> 2k) & 3
        sub-block s = value // 16.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import gguf
import numpy as np
import torch

from scalellm.protocol.errors import ModelLoadError, UnsupportedModelError

GGMLType = gguf.GGMLQuantizationType

__all__ = ["SUPPORTED_TYPES", "dequantize", "type_name"]

_QK_K = 256  # values per K-quant super-block


# ---------------------------------------------------------------------------- helpers


def _as_bytes(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A flat uint8 torch view of `data`'s bytes (no copy where possible)."""
    if isinstance(data, torch.Tensor):
        t = data.detach().contiguous()
        return t.view(torch.uint8).reshape(-1) if t.dtype != torch.uint8 else t.reshape(-1)
    arr = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        # Memory-mapped GGUF data is read-only. We only ever read from this view, and every
        # decoder below returns freshly allocated memory, so the warning does not apply.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(arr)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32, reading each row as one little-endian f16."""
    return raw.contiguous().view(torch.float16).to(torch.float32)


def _shifts(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """(n, k*group) bytes -> (n, k, 2, group): low nibbles then high nibbles of each group."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> _shifts(0, 4).view(1, 1, 2, 1)
    return q & 0x0F


def _bits(raw: torch.Tensor) -> torch.Tensor:
    """(n, b) bytes -> (n, 8*b) single bits, little-endian bit order (bit i of byte i//8)."""
    n = raw.shape[0]
    bits = (raw.reshape(n, -1, 1) >> _shifts(*range(8)).view(1, 1, 8)) & 1
    return bits.reshape(n, -1)


# ---------------------------------------------------------------------------- float types


def _dq_f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float32).clone()  # clone: never hand out the (read-only) mmap


def _dq_f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float16).to(torch.float32)


def _dq_bf16(raw: torch.Tensor) -> torch.Tensor:
    return (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


# ---------------------------------------------------------------------------- 32-value blocks


def _dq_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return q * d


def _dq_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:], 16).reshape(blocks.shape[0], 32)
    return d * (q.to(torch.int8) - 8).to(torch.float32)


def _dq_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:], 16).reshape(blocks.shape[0], 32)
    return d * q.to(torch.float32) + m


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit values of a Q5_0/Q5_1 block: low nibbles from qs, 5th bit from the u32 qh."""
    low = _nibbles(qs, 16).reshape(qs.shape[0], 32)
    return low | (_bits(qh) << 4)


def _dq_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _q5(blocks[:, 2:6], blocks[:, 6:])
    return d * (q.to(torch.int8) - 16).to(torch.float32)


def _dq_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _q5(blocks[:, 4:8], blocks[:, 8:])
    return d * q.to(torch.float32) + m


# ---------------------------------------------------------------------------- K-quants


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes -> (8 six-bit scales, 8 six-bit mins) per super-block (Q4_K/Q5_K)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Apply Q4_K/Q5_K super-block scales to q of shape (n, 8, 32)."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    scale = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    offset = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    return (scale * q.to(torch.float32) - offset).reshape(n, _QK_K)


def _dq_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 16:], 32).reshape(blocks.shape[0], 8, 32)
    return _k_affine(blocks, q)


def _dq_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    qh = blocks[:, 16:48].reshape(n, 1, 32) >> _shifts(*range(8)).view(1, 8, 1)
    low = _nibbles(blocks[:, 48:], 32).reshape(n, 8, 32)
    return _k_affine(blocks, low | ((qh & 1) << 4))


def _dq_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, :128], 64).reshape(n, 8, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6).view(1, 1, 4, 1)
    qh = (qh & 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    sc = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(blocks[:, 208:210])
    return ((d * sc).reshape(n, 16, 1) * q).reshape(n, _QK_K)


# ---------------------------------------------------------------------------- dispatch

# Float types decode the raw byte stream directly; block types get (n_blocks, type_size).
_FLOAT_DECODERS: dict[GGMLType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLType.F32: _dq_f32,
    GGMLType.F16: _dq_f16,
    GGMLType.BF16: _dq_bf16,
}
_BLOCK_DECODERS: dict[GGMLType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLType.Q8_0: _dq_q8_0,
    GGMLType.Q4_0: _dq_q4_0,
    GGMLType.Q4_1: _dq_q4_1,
    GGMLType.Q5_0: _dq_q5_0,
    GGMLType.Q5_1: _dq_q5_1,
    GGMLType.Q4_K: _dq_q4_k,
    GGMLType.Q5_K: _dq_q5_k,
    GGMLType.Q6_K: _dq_q6_k,
}

SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(_FLOAT_DECODERS) | frozenset(_BLOCK_DECODERS)


def type_name(ggml_type: int | GGMLType) -> str:
    """The ggml name of a type id ("Q4_K", "IQ2_XS", ...), or "unknown type N"."""
    try:
        return GGMLType(int(ggml_type)).name
    except ValueError:
        return f"unknown type {int(ggml_type)}"


def _resolve(ggml_type: int | GGMLType, name: str | None) -> GGMLType:
    tname = type_name(ggml_type)
    if not tname.startswith("unknown"):
        qtype = GGMLType(int(ggml_type))
        if qtype in SUPPORTED_TYPES:
            return qtype
    where = f" (tensor {name!r})" if name else ""
    supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
    raise UnsupportedModelError(
        f"GGUF tensor type {tname}{where} is not supported; supported types: {supported}"
    )


def dequantize(
    data: np.ndarray | torch.Tensor,
    ggml_type: int | GGMLType,
    shape: tuple[int, ...],
    name: str | None = None,
) -> torch.Tensor:
    """Decode the raw bytes of one GGUF tensor into a float32 tensor of `shape`.

    `data`: the tensor's bytes in file order, in any dtype/shape (GGUFReader hands out
    uint8 for block types, float16/float32 arrays for F16/F32; only the bytes matter).
    `shape`: the torch (row-major) shape, i.e. the reverse of the GGUF `ne` list.
    `name`: only used in error messages.
    """
    qtype = _resolve(ggml_type, name)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_values = 1
    for dim in shape:
        n_values *= int(dim)
    raw = _as_bytes(data)
    expected = n_values // block_size * type_size
    if n_values % block_size or raw.numel() != expected:
        where = f" {name!r}" if name else ""
        raise ModelLoadError(
            f"GGUF tensor{where}: {raw.numel()} bytes do not hold a {qtype.name} tensor "
            f"of shape {tuple(shape)} ({expected} bytes expected)"
        )
    if qtype in _FLOAT_DECODERS:
        out = _FLOAT_DECODERS[qtype](raw)
    else:
        out = _BLOCK_DECODERS[qtype](raw.reshape(-1, type_size))
    return out.reshape(tuple(int(d) for d in shape))
