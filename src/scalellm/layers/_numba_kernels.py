"""numba kernels of `paged_attention_cpu` (imported lazily: importing numba takes ~0.4 s).

Decode attention for each sequence b, in parallel, over the paged cache:

    s[g, j] = scale * q[b, h*G+g] . K[slot[b, j], h]        j < len[b], g < G (query heads per KV head)
    out[b, h*G+g] = softmax(s[g, :]) @ V[slot[b, :len[b]], h]

float32 arithmetic, two passes (scores, then one read of V). Caches, queries and outputs
are float32, or bfloat16 stored as its 16 raw bits (an int16 view: numba has no bfloat16;
`_numba_bits.ld` widens each element where it is read: 10% faster than widening a row
into a buffer first). The queries are the
first H*D columns of each row of q (a qkv projection's rows work as they are); the
softmax's exponentials are `fast_exp` (numba's np.exp is a libm call per element here).

`make_decode_attention(head_dim, group)` compiles one kernel per head size and group
size, both compile-time constants: LLVM then unrolls the per-head dot products and keeps
a group's accumulators in registers. Measured at SmolLM2's shapes (D=64, 9/3 heads, 64
sequences x 192 tokens, bfloat16): 1.09-1.27 ms per layer with them as run-time values,
0.68-0.70 ms as constants. numba caches each specialisation on disk (closures cache
by their constants).
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from scalellm.layers._numba_bits import fast_exp, ld, max_range, prefetch_row, st

_OPTS = {"parallel": True, "fastmath": True, "cache": True, "nogil": True, "error_model": "numpy"}

# NOTE: each sequence's K and V rows lie in 16-token blocks scattered over the cache, so
# the hardware prefetcher stalls at every block edge and a core waits on one miss at a
# time: a 64-sequence step over 30 layers' caches (263 MB, out of cache) read them at
# ~10 GB/s. Prefetching the row PREFETCH_AHEAD tokens ahead (K, then V, whose first rows
# are requested while the last keys are scored) took it from 26.4 to 18.5 ms; 8 to 24
# ahead measured alike, 48 worse.
PREFETCH_AHEAD = 16


@numba.njit(inline="always", fastmath=True)
def _softmax_rows(scores, length, lanes):  # pragma: no cover - numba
    for g in range(scores.shape[0]):
        best = max_range(scores, g, 0, length, lanes)
        total = np.float32(0.0)
        for j in range(length):
            e = fast_exp(scores[g, j] - best)
            scores[g, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(length):
            scores[g, j] *= inv


# NOTE: one work item per sequence, all heads: a token's K (and V) row of all KV heads is
# contiguous in the cache ([Hkv, D]), so each item streams whole rows. One item per
# (sequence, KV head) read a third of each row per pass and ran 2-2.7x slower on contexts
# that do not fit in cache (measured at 64 x ~150 tokens, SmolLM2's 9/3 heads).


def make_decode_attention(head_dim: int, group: int, codes: bool = False) -> Callable:
    """The decode attention kernel for heads of `head_dim` with `group` query heads per KV head:

        kernel(q, num_heads, k_cache, v_cache, k_scales, v_scales, slots, lens, scale, out)

    q: [B, >= H*D], out: [B, H*D], each float32 or int16 (bfloat16's raw bits); k_cache,
    v_cache: [N*S, Hkv*D] float32 or int16, or with `codes` int8 codes whose scales are
    k_scales, v_scales [N*S, Hkv] float32 (unused otherwise: a key's dot product and a
    value's weight take its row's scale); slots: [B, Lmax] int64; lens: [B] int64."""
    hd, grp, quantised = head_dim, group, codes  # closure constants: fixed at compile time

    @numba.njit(**_OPTS)
    def decode_attention(q, num_heads, k_cache, v_cache, k_scales, v_scales, slots, lens, scale,
                         out):  # pragma: no cover - numba
        num_seqs = q.shape[0]
        num_kv_heads = k_cache.shape[1] // hd
        for b in numba.prange(num_seqs):
            length = lens[b]
            qs = np.empty((num_heads, hd), dtype=np.float32)
            for hh in range(num_heads):
                for d in range(hd):
                    qs[hh, d] = ld(q, b, hh * hd + d) * scale
            scores = np.empty((num_heads, length), dtype=np.float32)
            lanes = np.empty(16, dtype=np.float32)
            ahead = min(PREFETCH_AHEAD, length)
            for j in range(ahead):
                prefetch_row(k_cache, slots[b, j])
            for j in range(length):
                if j + ahead < length:
                    prefetch_row(k_cache, slots[b, j + ahead])
                else:  # the last keys: start on the values
                    prefetch_row(v_cache, slots[b, j + ahead - length])
                slot = slots[b, j]
                for h in range(num_kv_heads):
                    for g in range(grp):
                        acc = np.float32(0.0)
                        for d in range(hd):
                            acc += qs[h * grp + g, d] * ld(k_cache, slot, h * hd + d)
                        scores[h * grp + g, j] = acc * k_scales[slot, h] if quantised else acc
            _softmax_rows(scores, length, lanes)
            acc2 = np.zeros((num_heads, hd), dtype=np.float32)
            for j in range(length):
                if j + ahead < length:
                    prefetch_row(v_cache, slots[b, j + ahead])
                slot = slots[b, j]
                for h in range(num_kv_heads):
                    for g in range(grp):
                        p = scores[h * grp + g, j] * v_scales[slot, h] if quantised else scores[h * grp + g, j]
                        for d in range(hd):
                            acc2[h * grp + g, d] += p * ld(v_cache, slot, h * hd + d)
            for hh in range(num_heads):
                for d in range(hd):
                    st(out, b, hh * hd + d, acc2[hh, d])

    return decode_attention
