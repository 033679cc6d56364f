"""Attention over the paged KV cache on GPU: Triton kernels that read K/V through each
sequence's block table where they lie (no gather, no padding, no mask): one for the
step's decodes (below), one for all its prefill chunks at once (`prefill_attention`).

    k_cache, v_cache: [N, S, Hkv, D]   (one layer's halves of the [2, N, S, Hkv, D] cache)
    block_tables:     [B, W] int32     (block ids of each sequence; only the first
                                        ceil(len / S) entries of a row are read)
    lens:             [B]              (context length of each sequence, this token included)
    q:                [B, H, D]        (any row and head strides; D contiguous)
    out:              [B, H*D]

One program per (sequence, KV head, split) handles the whole query group of that KV
head (GQA: K/V are read once per group, the group's queries form the rows of a
tensor-core dot), walking its share of the context in tiles of whole blocks with an
online softmax. The context is split into `num_splits` parts ("flash decoding") so small
batches still fill the GPU; a second small kernel merges the parts by their
log-sum-exp. The split count depends only on the batch and head counts, never on the
lengths, so a CUDA graph captured for a batch size stays valid for any context.

Knows nothing of requests or scheduling. `TRITON_INTERPRET=1` runs the same kernels on
CPU tensors (numpy), which is how CI checks them without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import torch

# NOTE: triton ships with torch's CUDA wheels (the CPU wheels lack it); the kernels live in
# _triton_attention, imported on first use, so a CPU process never loads triton (~73 MB).

TILE_TOKENS = 64  # context tokens per loop iteration (a multiple of the block size)
MAX_SPLITS = 16


@functools.cache
def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _k():  # the kernels module
    from scalellm.layers import _triton_attention

    return _triton_attention


def pack_block_tables(tables: list[list[int]], rows: int | None = None, fill: int = 0) -> np.ndarray:
    """Block tables as one [rows, longest] int32 array (the kernels' `block_tables`): row i
    holds tables[i] then `fill`; rows past len(tables) (CUDA-graph padding) are all `fill`."""
    tab = np.full((rows or len(tables), max((len(t) for t in tables), default=1)), fill, dtype=np.int32)
    for i, t in enumerate(tables):
        tab[i, : len(t)] = t
    return tab


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(k_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> bool:
    """Whether the kernel runs for this cache and these shapes (on CUDA, or anywhere when
    Triton interprets)."""
    if not (k_cache.is_cuda or interpreted()) or not available():
        return False
    pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    return (pow2 and num_heads % num_kv_heads == 0 and k_cache.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and TILE_TOKENS % block_size == 0)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Context splits per (sequence, KV head): about enough programs for two waves of the
    GPU's multiprocessors, rounded down to a power of two, at most MAX_SPLITS."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    want = -(-2 * sms // max(1, batch * num_kv_heads))
    # NOTE: a power of two: the split count is a compile-time constant, and free values made
    # eager steps of new batch sizes compile new variants mid-serving (seen on an H200 as a
    # c=256 run at 6.3k tok/s where a warm one ran 9.6k); powers of two are five variants,
    # all compiled when the CUDA graphs are captured.
    return 1 << (min(MAX_SPLITS, max(1, want)).bit_length() - 1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     lens: torch.Tensor, scale: float, out: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """q: [B, H, D]; k_cache, v_cache: [N, S, Hkv, D]; block_tables: [B, W]; lens: [B];
    out: [B, H*D] (written, and returned). Every sequence must have lens >= 1."""
    b, h, d = q.shape
    _, block_s, hkv, _ = k_cache.shape
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and out.stride(1) == 1
    assert out.shape == (b, h * d) and block_tables.shape[0] >= b and lens.shape[0] >= b
    if b == 0:
        return out
    group = h // hkv
    splits = splits or num_splits(b, hkv, q.device)
    precision = "ieee" if q.dtype == torch.float32 else None  # float32: exact products, not tf32
    # NOTE: Triton's interpreter (3.9) returns garbage from tl.dot on bfloat16 operands; it
    # runs the 16-bit kernels with the operands upcast (the GPU uses its bf16 tensor cores).
    upcast = interpreted() and q.dtype != torch.float32
    if splits > 1:
        mid_o = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out  # unused
    _k()._decode_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, block_tables, lens, out, mid_o, mid_lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), D=d, BLOCK_S=block_s,
        TILE=TILE_TOKENS, SPLITS=splits, PRECISION="ieee" if upcast else precision,
        UPCAST=upcast, num_warps=4, num_stages=2,
    )
    if splits > 1:
        _k()._merge_kernel[(b, h)](mid_o, mid_lse, out, out.stride(0), H=h, D=d, SPLITS=splits,
                              SPLITS_PAD=next_power_of_2(splits), num_warps=4)
    return out


PREFILL_TILE = 64  # queries and keys per tile of the prefill kernel


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      meta: torch.Tensor, max_q_len: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Causal attention of every prefill chunk of a step in one launch, over K/V in the
    paged cache (the chunk's own K/V already written there).

    q: [T, H, D] (the step's rows; any row and head strides); block_tables: [P, W] int32,
    one row per chunk; meta: [3, P] int32 (each chunk's first row in q, its query count,
    its context length after this step); out: [T, H*D], only the chunks' rows written.
    Chunk query i sits at position ctx - q_len + i and sees keys 0..that position."""
    _, h, d = q.shape
    _, block_s, hkv, _ = k_cache.shape
    p = meta.shape[1]
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and out.stride(1) == 1
    assert meta.is_contiguous() and block_tables.shape[0] == p
    if p == 0 or max_q_len == 0:
        return out
    upcast = interpreted() and q.dtype != torch.float32
    precision = "ieee" if q.dtype == torch.float32 or upcast else None
    grid = (p, -(-max_q_len // PREFILL_TILE), h)
    _k()._prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, meta, out, scale, p,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0),
        GROUP=h // hkv, D=d, BLOCK_S=block_s, BM=PREFILL_TILE, BN=PREFILL_TILE, PRECISION=precision,
        UPCAST=upcast, num_warps=4, num_stages=2,
    )
    return out
