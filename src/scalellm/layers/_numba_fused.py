"""numba kernels of `fused_cpu` (imported lazily: importing numba takes ~0.4 s).

Each replaces a chain of small torch ops (each a pass over memory, an allocation and a
dtype conversion for bfloat16) with one pass; rows run in parallel. Arrays are 2-D,
float32 or bfloat16 as int16 bits (`_numba_bits`); arithmetic in float32, rounding where
torch's own chain rounds, so results match the torch path bit for bit or within an ulp.

    rms_norm      [sum_out = x + residual]; out = weight * round(norm(sum))
    silu_and_mul  out = round(silu(gate)) * up          x = [gate | up]
    silu_table / silu_and_mul_table  the same for bfloat16 through a table of round(silu(g))
                  for all 65,536 bfloat16 values of g (256 KiB of float32: stays in L2)
    make_rope_write_kv  (one kernel per head size) q and k heads of a qkv row rotated in
                  place, then k and v copied to the paged cache at the token's slot
    inverse_cdf   one draw per row from unnormalised probabilities (the sampler's)
    sample_softmax  one draw per row from softmax(logits / temperature), never materialised
    rescore_near_max  exact float32 logits for the tokens near each row's maximum
"""

from __future__ import annotations

import numba
import numpy as np

from numba.extending import register_jitable

from scalellm.layers._numba_bits import bits_to_f32, fast_exp, ld, max_range, rnd, st

_OPTS = {"parallel": True, "fastmath": True, "cache": True, "nogil": True, "error_model": "numpy"}


@numba.njit(**_OPTS)
def rms_norm(x, residual, has_residual, weight, eps, round_mid, out, sum_out):  # pragma: no cover - numba
    # x, residual, sum_out: [T, E] (one dtype); weight: [1, E]; out: [T, E] (x's dtype or float32).
    # has_residual: sum_out = round(x + residual) is normed (and kept); else x is.
    # round_mid: round the normed value to x's dtype before the weight (torch's
    # `weight * x32.to(dtype)`); else `weight.float() * x32`.
    num_tokens, hidden = x.shape
    for t in numba.prange(num_tokens):
        ss = np.float32(0.0)
        if has_residual:
            for e in range(hidden):
                s = rnd(sum_out, ld(x, t, e) + ld(residual, t, e))
                st(sum_out, t, e, s)
                ss += s * s
        else:
            for e in range(hidden):
                s = ld(x, t, e)
                ss += s * s
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(hidden) + eps)
        for e in range(hidden):
            s = ld(sum_out, t, e) if has_residual else ld(x, t, e)
            n = s * inv
            if round_mid:
                n = rnd(x, n)
            st(out, t, e, ld(weight, 0, e) * n)


@numba.njit(**_OPTS)
def silu_and_mul(x, out):  # pragma: no cover - numba
    # x: [T, 2I] = [gate | up]; out: [T, I], same dtype
    num_tokens, inter = out.shape
    for t in numba.prange(num_tokens):
        for i in range(inter):
            g = ld(x, t, i)
            s = rnd(out, g / (np.float32(1.0) + fast_exp(-g)))
            st(out, t, i, s * ld(x, t, inter + i))


@numba.njit(**_OPTS)
def silu_table(table, like):  # pragma: no cover - numba
    # table: [65536] float32; entry b = round(silu(g)) to like's dtype, g the bfloat16 of bits b
    for b in numba.prange(table.shape[0]):
        g = bits_to_f32(np.uint32(b) << np.uint32(16))
        table[b] = rnd(like, g / (np.float32(1.0) + fast_exp(-g)))


@numba.njit(**_OPTS)
def silu_and_mul_table(x, table, out):  # pragma: no cover - numba
    # silu_and_mul for bfloat16 x (int16 bits): round(silu(gate)) looked up, not computed.
    # NOTE: at 2,048 x 1,536 the exponential made the kernel compute-bound: 0.76 ms, 0.41
    # with the table (one gather from L2 per element); at 64 rows 0.032 -> 0.012 ms.
    num_tokens, inter = out.shape
    for t in numba.prange(num_tokens):
        for i in range(inter):
            s = table[np.uint16(x[t, i])]
            st(out, t, i, s * ld(x, t, inter + i))


@register_jitable
def _write_codes(src, t, col, hd, cache, slot, h, scales):  # pragma: no cover - numba
    """src[t, col:col+hd] -> 8-bit codes in cache[slot, h*hd:(h+1)*hd] and their scale in
    scales[slot, h]: scale = max|x| / 127, code = round_half_even(x / scale) (as
    kv_quant.quantize does in torch)."""
    amax = np.float32(0.0)
    for d in range(hd):
        x = abs(ld(src, t, col + d))
        amax = amax if amax > x else x
    scale = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
    scales[slot, h] = scale
    for d in range(hd):
        cache[slot, h * hd + d] = np.int8(np.rint(ld(src, t, col + d) / scale))


def make_rope_write_kv(head_dim: int, codes: bool = False):  # type: ignore[no-untyped-def]
    """The rotary + KV-write kernel for heads of `head_dim` (a compile-time constant):

        kernel(qkv, num_heads, num_kv_heads, positions, cos, sin, slots, k_cache, v_cache,
               k_scales, v_scales)

    qkv: [T, (H + 2 Hkv) D] with q heads, then k heads, then v heads; positions, slots: [T];
    cos, sin: [P, D/2] float32; k_cache, v_cache: [N*S, Hkv*D] in qkv's dtype, or with
    `codes` int8 codes whose scales go to k_scales, v_scales [N*S, Hkv] float32 (unused
    otherwise). Rotates q and k in place (neox "rotate half"), then copies (or quantises)
    the token's k and v rows to its slot. With has_row_scales, qkv is an int8 linear's output
    whose row t is still to be multiplied by row_scales[t] [T] float32: done in place first.

    NOTE: with the head size a run-time value LLVM left the rotation scalar (the halves it
    reads and writes might overlap): 0.75 ms for 2,048 tokens of SmolLM2's 12 q+k heads, 0.31
    ms with it a constant. Each pair (i, i + D/2) is read, then written, in one iteration, with
    no scratch arrays: a per-token np.empty (an allocation in numba) cost 0.62 vs 0.42 ms at
    2,048 tokens with the KV write."""
    hd = head_dim
    half = hd // 2
    quantised = codes

    @numba.njit(**_OPTS)
    def rope_write_kv(qkv, num_heads, num_kv_heads, positions, cos, sin, slots, k_cache, v_cache,
                      k_scales, v_scales, row_scales, has_row_scales):  # pragma: no cover - numba
        num_tokens = qkv.shape[0]
        k_col = num_heads * hd
        v_col = (num_heads + num_kv_heads) * hd
        for t in numba.prange(num_tokens):
            p = positions[t]
            slot = slots[t]
            rs = row_scales[t] if has_row_scales else np.float32(1.0)
            if has_row_scales:  # an int8 linear's output, its row scale still to apply: v here
                # (in place, for prefill attention, and straight to the cache: storing it while it
                # is made took 1.22 against 1.49 ms at 4,096 tokens), q and k as they are rotated,
                # each rounded first as the dense output would be (the same values as
                # ScaledRows.dense(), then rotated)
                for j in range(num_kv_heads * hd):
                    y = rnd(qkv, ld(qkv, t, v_col + j) * rs)
                    st(qkv, t, v_col + j, y)
                    if not quantised:
                        st(v_cache, slot, j, y)
            for h in range(num_heads + num_kv_heads):
                base = h * hd
                for i in range(half):
                    x1 = ld(qkv, t, base + i)
                    x2 = ld(qkv, t, base + half + i)
                    if has_row_scales:  # (loop-invariant: LLVM unswitches it)
                        x1 = rnd(qkv, x1 * rs)
                        x2 = rnd(qkv, x2 * rs)
                    c = cos[p, i]
                    s = sin[p, i]
                    st(qkv, t, base + i, x1 * c - x2 * s)
                    st(qkv, t, base + half + i, x2 * c + x1 * s)
            if quantised:
                for h in range(num_kv_heads):
                    _write_codes(qkv, t, k_col + h * hd, hd, k_cache, slot, h, k_scales)
                    _write_codes(qkv, t, v_col + h * hd, hd, v_cache, slot, h, v_scales)
            else:  # same dtype: the raw elements (v is in the cache already when scaled)
                for j in range(num_kv_heads * hd):
                    k_cache[slot, j] = qkv[t, k_col + j]
                if not has_row_scales:
                    for j in range(num_kv_heads * hd):
                        v_cache[slot, j] = qkv[t, v_col + j]

    return rope_write_kv


_CDF_BLOCK = 512


@numba.njit(inline="always")
def _find_block(sums, target):  # pragma: no cover - numba
    """The block whose cumulative range holds `target` (the last one at most), and the mass
    of the blocks before it."""
    run = 0.0
    k = 0
    while k < sums.shape[0] - 1 and run + sums[k] <= target:
        run += sums[k]
        k += 1
    return k, run


@numba.njit(**_OPTS)
def inverse_cdf(probs, u, out):  # pragma: no cover - numba
    # probs: [B, V] float32, non-negative, any total; u: [B] float64 in [0, 1) -> out[b]: the
    # first i with cumsum(probs[b])[i] > u[b] * total (float64 sums), never a zero-probability
    # token. Two levels: block sums (vectorised), then a walk over the blocks and in one.
    num_rows, vocab = probs.shape
    num_blocks = (vocab + _CDF_BLOCK - 1) // _CDF_BLOCK
    for b in numba.prange(num_rows):
        sums = np.empty(num_blocks, dtype=np.float64)
        total = 0.0
        for k in range(num_blocks):
            acc = 0.0
            for i in range(k * _CDF_BLOCK, min(vocab, (k + 1) * _CDF_BLOCK)):
                acc += probs[b, i]
            sums[k] = acc
            total += acc
        target = u[b] * total
        k, run = _find_block(sums, target)
        pick = -1
        for i in range(k * _CDF_BLOCK, min(vocab, (k + 1) * _CDF_BLOCK)):
            run += probs[b, i]
            if run > target and probs[b, i] > 0:
                pick = i
                break
        if pick < 0:  # rounding left the target at the very end: the last token with mass
            pick = vocab - 1
            while pick > 0 and probs[b, pick] <= 0:
                pick -= 1
        out[b] = pick


_CHUNK = 64  # rescore_near_max: elements per chunk maximum


@numba.njit(**_OPTS)
def rescore_near_max(logits, hidden, weight, rel_margin, abs_margin):  # pragma: no cover - numba
    # logits: [B, V] float32 from a GEMM whose outputs were rounded (bfloat16: each within
    # |exact| * 2^-8); hidden: [B, E] float32; weight: [V, E] (float32 or bfloat16 bits).
    # Every token within rel_margin * |max| + abs_margin of its row's maximum is recomputed
    # exactly (float32 dot product), in place: the row's true maximum is among them.
    # One read of the row: chunk maxima (vectorised), then only chunks that reach the
    # threshold are scanned again (from cache).
    num_rows, vocab = logits.shape
    hidden_size = hidden.shape[1]
    num_chunks = (vocab + _CHUNK - 1) // _CHUNK
    for b in numba.prange(num_rows):
        chunk_max = np.empty(num_chunks, dtype=np.float32)
        lanes = np.empty(16, dtype=np.float32)
        best = np.float32(-np.inf)
        for c in range(num_chunks):
            m = max_range(logits, b, c * _CHUNK, min(vocab, (c + 1) * _CHUNK), lanes)
            chunk_max[c] = m
            best = best if best > m else m
        threshold = best - (abs(best) * rel_margin + abs_margin)
        for c in range(num_chunks):
            if chunk_max[c] < threshold:
                continue
            for v in range(c * _CHUNK, min(vocab, (c + 1) * _CHUNK)):
                if logits[b, v] >= threshold:
                    acc = np.float32(0.0)
                    for e in range(hidden_size):
                        acc += hidden[b, e] * ld(weight, v, e)
                    logits[b, v] = acc


@numba.njit(inline="always", fastmath=True)
def _weight(x, block_max, scale):  # pragma: no cover - numba
    # exp((x - block_max) * scale), exactly 0 for -inf logits (banned tokens)
    # NOTE: a select, not a branch around fast_exp: the loop then vectorises (3.5 -> 1.3 ms at 64 x 49k)
    y = (x - block_max) * scale
    e = fast_exp(y)
    return e if y > np.float32(-80.0) else np.float32(0.0)


@numba.njit(**_OPTS)
def sample_softmax(logits, inv_temps, u, out):  # pragma: no cover - numba
    # logits: [B, V] float32; inv_temps: [B] float32; u: [B] float64 in [0, 1) -> out[b]: one
    # draw from softmax(logits[b] * inv_temps[b]) by inverse CDF. One read of the row: each
    # block's maximum and its sum of exponentials relative to it (the block stays in cache),
    # then the blocks are rescaled to the row's maximum (float64) and walked.
    num_rows, vocab = logits.shape
    num_blocks = (vocab + _CDF_BLOCK - 1) // _CDF_BLOCK
    for b in numba.prange(num_rows):
        scale = inv_temps[b]
        block_max = np.empty(num_blocks, dtype=np.float32)
        sums = np.empty(num_blocks, dtype=np.float64)
        lanes = np.empty(16, dtype=np.float32)
        best = np.float32(-np.inf)
        for k in range(num_blocks):
            lo, hi = k * _CDF_BLOCK, min(vocab, (k + 1) * _CDF_BLOCK)
            m = max_range(logits, b, lo, hi, lanes)
            block_max[k] = m
            best = best if best > m else m
            acc = np.float32(0.0)
            if m > np.float32(-np.inf):
                for v in range(lo, hi):
                    acc += _weight(logits[b, v], m, scale)
            sums[k] = acc
        total = 0.0
        for k in range(num_blocks):
            if sums[k] > 0:
                sums[k] *= np.exp(np.float64((block_max[k] - best) * scale))
            total += sums[k]
        target = u[b] * total
        k, run = _find_block(sums, target)
        pick = -1
        if sums[k] > 0:
            lo, hi = k * _CDF_BLOCK, min(vocab, (k + 1) * _CDF_BLOCK)
            factor = np.exp(np.float64((block_max[k] - best) * scale))
            for v in range(lo, hi):
                p = _weight(logits[b, v], block_max[k], scale)
                run += p * factor
                if run > target and p > 0:
                    pick = v
                    break
            if pick < 0:  # rounding: the last token with mass in this block
                for v in range(hi - 1, lo - 1, -1):
                    if _weight(logits[b, v], block_max[k], scale) > 0:
                        pick = v
                        break
        if pick < 0:  # the target fell past every block with mass: the last such token
            for kk in range(num_blocks - 1, -1, -1):
                if sums[kk] > 0:
                    for v in range(min(vocab, (kk + 1) * _CDF_BLOCK) - 1, kk * _CDF_BLOCK - 1, -1):
                        if _weight(logits[b, v], block_max[kk], scale) > 0:
                            pick = v
                            break
                    break
        out[b] = pick
