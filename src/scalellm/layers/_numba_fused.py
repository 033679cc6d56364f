"""numba kernels of `fused_cpu` (imported lazily: importing numba takes ~0.4 s).

Each replaces a chain of small torch ops (each a pass over memory, an allocation and a
dtype conversion for bfloat16) with one pass; rows run in parallel. Arrays are 2-D,
float32 or bfloat16 as int16 bits (`_numba_bits`); arithmetic in float32, rounding where
torch's own chain rounds, so results match the torch path bit for bit or within an ulp.

    rms_norm      [sum_out = x + residual]; out = weight * round(norm(sum))
    silu_and_mul  out = round(silu(gate)) * up          x = [gate | up]
    rope_write_kv q and k heads of a qkv row rotated in place, then k and v copied to
                  the paged cache at the token's slot
    inverse_cdf   one draw per row from unnormalised probabilities (the sampler's)
    sample_softmax  one draw per row from softmax(logits / temperature), never materialised
    rescore_near_max  exact float32 logits for the tokens near each row's maximum
"""

from __future__ import annotations

import numba
import numpy as np

from scalellm.layers._numba_bits import fast_exp, ld, rnd, st

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
def rope_write_kv(qkv, num_heads, num_kv_heads, head_dim, positions, cos, sin, slots, k_cache, v_cache):  # pragma: no cover - numba
    # qkv: [T, (H + 2 Hkv) D] with q heads, then k heads, then v heads; positions, slots: [T];
    # cos, sin: [P, D/2] float32; k_cache, v_cache: [N*S, Hkv*D]. Rotates q and k in place
    # (neox "rotate half"), then copies the token's k and v rows to its slot.
    num_tokens = qkv.shape[0]
    half = head_dim // 2
    k_col = num_heads * head_dim
    v_col = (num_heads + num_kv_heads) * head_dim
    for t in numba.prange(num_tokens):
        p = positions[t]
        for h in range(num_heads + num_kv_heads):
            base = h * head_dim
            for i in range(half):
                x1 = ld(qkv, t, base + i)
                x2 = ld(qkv, t, base + half + i)
                c = cos[p, i]
                s = sin[p, i]
                st(qkv, t, base + i, x1 * c - x2 * s)
                st(qkv, t, base + half + i, x2 * c + x1 * s)
        slot = slots[t]
        for j in range(num_kv_heads * head_dim):
            st(k_cache, slot, j, ld(qkv, t, k_col + j))
            st(v_cache, slot, j, ld(qkv, t, v_col + j))


_CDF_BLOCK = 512


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
        run = 0.0
        k = 0
        while k < num_blocks - 1 and run + sums[k] <= target:
            run += sums[k]
            k += 1
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


@numba.njit(**_OPTS)
def rescore_near_max(logits, hidden, weight, rel_margin, abs_margin):  # pragma: no cover - numba
    # logits: [B, V] float32 from a GEMM whose outputs were rounded (bfloat16: each within
    # |exact| * 2^-8); hidden: [B, E] float32; weight: [V, E] (float32 or bfloat16 bits).
    # Every token within rel_margin * |max| + abs_margin of its row's maximum is recomputed
    # exactly (float32 dot product), in place: the row's true maximum is among them.
    num_rows, vocab = logits.shape
    hidden_size = hidden.shape[1]
    for b in numba.prange(num_rows):
        best = np.float32(-np.inf)
        for v in range(vocab):
            best = max(best, logits[b, v])
        threshold = best - (abs(best) * rel_margin + abs_margin)
        for v in range(vocab):
            if logits[b, v] >= threshold:
                acc = np.float32(0.0)
                for e in range(hidden_size):
                    acc += hidden[b, e] * ld(weight, v, e)
                logits[b, v] = acc


@numba.njit(**_OPTS)
def sample_softmax(logits, inv_temps, u, out):  # pragma: no cover - numba
    # logits: [B, V] float32; inv_temps: [B] float32; u: [B] float64 in [0, 1) -> out[b]: one
    # draw from softmax(logits[b] * inv_temps[b]) by inverse CDF (float64 block sums, as
    # inverse_cdf). -inf logits (banned tokens) have probability exactly 0.
    num_rows, vocab = logits.shape
    num_blocks = (vocab + _CDF_BLOCK - 1) // _CDF_BLOCK
    for b in numba.prange(num_rows):
        best = np.float32(-np.inf)
        for v in range(vocab):
            best = max(best, logits[b, v])
        scale = inv_temps[b]
        sums = np.empty(num_blocks, dtype=np.float64)
        total = 0.0
        for k in range(num_blocks):
            acc = 0.0
            for v in range(k * _CDF_BLOCK, min(vocab, (k + 1) * _CDF_BLOCK)):
                x = (logits[b, v] - best) * scale
                acc += fast_exp(x) if x > np.float32(-80.0) else np.float32(0.0)
            sums[k] = acc
            total += acc
        target = u[b] * total
        run = 0.0
        k = 0
        while k < num_blocks - 1 and run + sums[k] <= target:
            run += sums[k]
            k += 1
        pick = -1
        for v in range(k * _CDF_BLOCK, min(vocab, (k + 1) * _CDF_BLOCK)):
            x = (logits[b, v] - best) * scale
            p = fast_exp(x) if x > np.float32(-80.0) else np.float32(0.0)
            run += p
            if run > target and p > 0:
                pick = v
                break
        if pick < 0:  # rounding left the target at the very end: the last token with mass
            pick = vocab - 1
            while pick > 0 and not (logits[b, pick] - best) * scale > np.float32(-80.0):
                pick -= 1
        out[b] = pick
