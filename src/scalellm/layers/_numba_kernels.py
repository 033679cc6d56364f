"""numba kernels of `paged_attention_cpu` (imported lazily: importing numba takes ~0.4 s).

Decode attention for each sequence b, in parallel, over the paged cache:

    s[g, j] = scale * q[b, h*G+g] . K[slot[b, j], h]        j < len[b], g < G (query heads per KV head)
    out[b, h*G+g] = softmax(s[g, :]) @ V[slot[b, :len[b]], h]

float32 arithmetic, two passes (scores, then one read of V). One kernel, compiled
per cache layout: float32, or bfloat16 stored as its 16 raw bits (an int16 view:
numba has no bfloat16; `_row` widens each row it reads).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import overload

_OPTS = {"parallel": True, "fastmath": True, "cache": True, "nogil": True, "error_model": "numpy"}


@numba.njit(inline="always", fastmath=True)
def _scaled_queries(q, b, scale):  # pragma: no cover - numba
    num_heads, head_dim = q.shape[1], q.shape[2]
    qs = np.empty((num_heads, head_dim), dtype=np.float32)
    for hh in range(num_heads):
        for d in range(head_dim):
            qs[hh, d] = q[b, hh, d] * scale
    return qs


@numba.njit(inline="always", fastmath=True)
def _score_token(qs, row, group, scores, j):  # pragma: no cover - numba
    # row: [Hkv, D] of one token; scores[hh, j] = qs[hh] . row[hh // group]
    for hh in range(qs.shape[0]):
        h = hh // group
        acc = np.float32(0.0)
        for d in range(qs.shape[1]):
            acc += qs[hh, d] * row[h, d]
        scores[hh, j] = acc


@numba.njit(inline="always", fastmath=True)
def _softmax_rows(scores, length):  # pragma: no cover - numba
    for g in range(scores.shape[0]):
        best = np.float32(-np.inf)
        for j in range(length):
            best = max(best, scores[g, j])
        total = np.float32(0.0)
        for j in range(length):
            e = np.exp(scores[g, j] - best)
            scores[g, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(length):
            scores[g, j] *= inv


@numba.njit(inline="always", fastmath=True)
def _accumulate_token(acc, scores, j, row, group):  # pragma: no cover - numba
    for hh in range(acc.shape[0]):
        h = hh // group
        p = scores[hh, j]
        for d in range(acc.shape[1]):
            acc[hh, d] += p * row[h, d]


def _row(cache, slot, buf):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(_row, inline="always")
def _row_impl(cache, slot, buf):  # pragma: no cover - numba
    """One token's [Hkv, D] row as float32: the cache's own row, or for a bfloat16 cache (its
    16 raw bits in an int16 array) the row widened into `buf` (bfloat16 is a float32's high
    half: shift the bits up)."""
    if cache.dtype == numba.types.float32:
        return lambda cache, slot, buf: cache[slot]

    def widen(cache, slot, buf):
        bits = cache[slot]
        for h in range(bits.shape[0]):
            for d in range(bits.shape[1]):
                buf[h, d] = np.uint32(np.uint16(bits[h, d])) << np.uint32(16)
        return buf.view(np.float32)

    return widen


# NOTE: one work item per sequence, all heads: a token's K (and V) row of all KV heads is
# contiguous in the cache ([Hkv, D]), so each item streams whole rows. One item per
# (sequence, KV head) read a third of each row per pass and ran 2-2.7x slower on contexts
# that do not fit in cache (measured at 64 x ~150 tokens, SmolLM2's 9/3 heads).


@numba.njit(**_OPTS)
def decode_attention(q, k_cache, v_cache, slots, lens, scale, out):  # pragma: no cover - numba
    # q, out: [B, H, D] f32; k_cache, v_cache: [N*S, Hkv, D] float32, or int16 (bfloat16's raw
    # bits); slots: [B, Lmax]; lens: [B]
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    for b in numba.prange(num_seqs):
        length = lens[b]
        qs = _scaled_queries(q, b, scale)
        scores = np.empty((num_heads, length), dtype=np.float32)
        buf = np.empty((num_kv_heads, head_dim), dtype=np.uint32)  # widening buffer (bfloat16 caches)
        for j in range(length):
            _score_token(qs, _row(k_cache, slots[b, j], buf), group, scores, j)
        _softmax_rows(scores, length)
        acc = np.zeros((num_heads, head_dim), dtype=np.float32)
        for j in range(length):
            _accumulate_token(acc, scores, j, _row(v_cache, slots[b, j], buf), group)
        out[b] = acc
