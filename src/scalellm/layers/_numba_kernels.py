"""numba kernels of `paged_attention_cpu` (imported lazily: importing numba takes ~0.4 s).

Decode attention for each sequence b, in parallel, over the paged cache:

    s[g, j] = scale * q[b, h*G+g] . K[slot[b, j], h]        j < len[b], g < G (query heads per KV head)
    out[b, h*G+g] = softmax(s[g, :]) @ V[slot[b, :len[b]], h]

float32 arithmetic, two passes (scores, then one read of V).
Two cache layouts: float32, and bfloat16 stored as its 16 raw bits (an int16 view:
numba has no bfloat16; widening is a 16-bit shift into a float32's high half).
"""

from __future__ import annotations

import numba
import numpy as np

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


@numba.njit(inline="always")
def _widen_bf16(bits, buf_u32):  # pragma: no cover - numba
    # bfloat16 is the high half of a float32: shift the 16 stored bits up. bits, buf: [Hkv, D]
    for h in range(bits.shape[0]):
        for d in range(bits.shape[1]):
            buf_u32[h, d] = np.uint32(np.uint16(bits[h, d])) << np.uint32(16)


# NOTE: one work item per sequence, all heads: a token's K (and V) row of all KV heads is
# contiguous in the cache ([Hkv, D]), so each item streams whole rows. One item per
# (sequence, KV head) read a third of each row per pass and ran 2-2.7x slower on contexts
# that do not fit in cache (measured at 64 x ~150 tokens, SmolLM2's 9/3 heads).


@numba.njit(**_OPTS)
def decode_attention_f32(q, k_cache, v_cache, slots, lens, scale, out):  # pragma: no cover - numba
    # q, out: [B, H, D] f32; k_cache, v_cache: [N*S, Hkv, D] f32; slots: [B, Lmax]; lens: [B]
    num_seqs, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[1]
    for b in numba.prange(num_seqs):
        length = lens[b]
        qs = _scaled_queries(q, b, scale)
        scores = np.empty((num_heads, length), dtype=np.float32)
        for j in range(length):
            _score_token(qs, k_cache[slots[b, j]], group, scores, j)
        _softmax_rows(scores, length)
        acc = np.zeros((num_heads, head_dim), dtype=np.float32)
        for j in range(length):
            _accumulate_token(acc, scores, j, v_cache[slots[b, j]], group)
        out[b] = acc


@numba.njit(**_OPTS)
def decode_attention_bf16(q, k_bits, v_bits, slots, lens, scale, out):  # pragma: no cover - numba
    # as decode_attention_f32, with k_bits, v_bits: [N*S, Hkv, D] int16 (bfloat16's raw bits)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_bits.shape[1]
    group = num_heads // num_kv_heads
    for b in numba.prange(num_seqs):
        length = lens[b]
        qs = _scaled_queries(q, b, scale)
        scores = np.empty((num_heads, length), dtype=np.float32)
        buf_u32 = np.empty((num_kv_heads, head_dim), dtype=np.uint32)
        row = buf_u32.view(np.float32)
        for j in range(length):
            _widen_bf16(k_bits[slots[b, j]], buf_u32)
            _score_token(qs, row, group, scores, j)
        _softmax_rows(scores, length)
        acc = np.zeros((num_heads, head_dim), dtype=np.float32)
        for j in range(length):
            _widen_bf16(v_bits[slots[b, j]], buf_u32)
            _accumulate_token(acc, scores, j, row, group)
        out[b] = acc
