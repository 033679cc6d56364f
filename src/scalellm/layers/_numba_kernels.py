"""numba kernels of `paged_attention_cpu` (imported lazily: importing numba takes ~0.4 s).

Decode attention for each (sequence b, KV head h), in parallel, over the paged cache:

    s[g, j] = scale * q[b, h*G+g] . K[slot[b, j], h]        j < len[b], g < G (query heads per KV head)
    out[b, h*G+g] = softmax(s[g, :]) @ V[slot[b, :len[b]], h]

float32 arithmetic, two passes (scores, then one read of V for the whole group).
Two cache layouts: float32, and bfloat16 stored as its 16 raw bits (an int16 view:
numba has no bfloat16; widening is a 16-bit shift into a float32's high half).
"""

from __future__ import annotations

import numba
import numpy as np

_OPTS = {"parallel": True, "fastmath": True, "cache": True, "nogil": True}


@numba.njit(inline="always", fastmath=True)
def _scores_row(qh, row, scale):  # pragma: no cover - numba
    acc = np.float32(0.0)
    for d in range(row.shape[0]):
        acc += qh[d] * row[d]
    return acc * scale


@numba.njit(inline="always", fastmath=True)
def _softmax_rows(scores, length):  # pragma: no cover - numba
    for g in range(scores.shape[0]):
        best = np.float32(-np.inf)
        for j in range(length):
            if scores[g, j] > best:
                best = scores[g, j]
        total = np.float32(0.0)
        for j in range(length):
            e = np.exp(scores[g, j] - best)
            scores[g, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(length):
            scores[g, j] *= inv


@numba.njit(inline="always", fastmath=True)
def _accumulate(acc, scores, j, row):  # pragma: no cover - numba
    for g in range(acc.shape[0]):
        p = scores[g, j]
        for d in range(row.shape[0]):
            acc[g, d] += p * row[d]


@numba.njit(inline="always")
def _widen_bf16(bits, buf_u32):  # pragma: no cover - numba
    # bfloat16 is the high half of a float32: shift the 16 stored bits up
    for d in range(bits.shape[0]):
        buf_u32[d] = np.uint32(np.uint16(bits[d])) << np.uint32(16)


@numba.njit(**_OPTS)
def decode_attention_f32(q, k_cache, v_cache, slots, lens, scale, out):  # pragma: no cover - numba
    # q, out: [B, H, D] f32; k_cache, v_cache: [N*S, Hkv, D] f32; slots: [B, Lmax]; lens: [B]
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    for item in numba.prange(num_seqs * num_kv_heads):
        b = item // num_kv_heads
        h = item - b * num_kv_heads
        length = lens[b]
        scores = np.empty((group, length), dtype=np.float32)
        for j in range(length):
            row = k_cache[slots[b, j], h]
            for g in range(group):
                scores[g, j] = _scores_row(q[b, h * group + g], row, scale)
        _softmax_rows(scores, length)
        acc = np.zeros((group, head_dim), dtype=np.float32)
        for j in range(length):
            _accumulate(acc, scores, j, v_cache[slots[b, j], h])
        for g in range(group):
            out[b, h * group + g, :] = acc[g]


@numba.njit(**_OPTS)
def decode_attention_bf16(q, k_bits, v_bits, slots, lens, scale, out):  # pragma: no cover - numba
    # as decode_attention_f32, with k_bits, v_bits: [N*S, Hkv, D] int16 (bfloat16's raw bits)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_bits.shape[1]
    group = num_heads // num_kv_heads
    for item in numba.prange(num_seqs * num_kv_heads):
        b = item // num_kv_heads
        h = item - b * num_kv_heads
        length = lens[b]
        scores = np.empty((group, length), dtype=np.float32)
        buf_u32 = np.empty(head_dim, dtype=np.uint32)
        row = buf_u32.view(np.float32)
        for j in range(length):
            _widen_bf16(k_bits[slots[b, j], h], buf_u32)
            for g in range(group):
                scores[g, j] = _scores_row(q[b, h * group + g], row, scale)
        _softmax_rows(scores, length)
        acc = np.zeros((group, head_dim), dtype=np.float32)
        for j in range(length):
            _widen_bf16(v_bits[slots[b, j], h], buf_u32)
            _accumulate(acc, scores, j, row)
        for g in range(group):
            out[b, h * group + g, :] = acc[g]
