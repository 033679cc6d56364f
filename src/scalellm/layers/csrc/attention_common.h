/*
 * Causal self-attention of prefill chunks on the CPU, the part its two kernels share:
 * causal_attention_amx.c (AMX tiles) and causal_attention_avx512.c (AVX-512 BF16, VDPBF16PS)
 * include this after defining how a block of up to 16 query rows gets its scores and its
 * output (the hooks below); this file is the rest: the call's signature, the work split, the
 * packing of K and V, the causal softmax and the output's rounding.
 *
 * One call covers every prefill chunk of a step, whatever their lengths: fresh prompts, and
 * chunks that continue a cached context (their keys read through a row index, e.g. the KV
 * cache's slots). The unit of work is (chunk, KV head), split over `num_threads` OpenMP
 * threads. Per unit, K is packed in pairs of head dimensions (block j, chunk c of 32 dims: row
 * p = dims (32c + 2p, +1), column n = key 16j + n) and V in pairs of keys (chunk kc of 32
 * keys, block b of 16 dims: row p = keys (32kc + 2p, +1), column d = dim 16b + d), the layouts
 * of AMX's B tiles and of VDPBF16PS's pairs alike; then for each query head of the group and
 * each block of 16 query rows:
 *   S = Q K^T over the key blocks the block's rows may see (causal), float32 (hook);
 *   P = exp(scale * S - row max) with the causal mask, float32, rounded to bf16;
 *   O = P V in float32 (hook), divided by the row sums, rounded to bf16 into `out`.
 *
 * Layout: bf16 bits as uint16. Query row r, head h at q + r * q_rs + h * D; key (value) row
 * r, KV head g at k + r * k_rs + g * D (v + r * v_rs + g * D); output at out + r * o_rs +
 * h * D. Head h reads KV head h / (H / Hkv). D: a multiple of 32, at most 128.
 *
 * Hooks the includer defines first:
 *   attn_thread_begin() / attn_thread_end(): around a thread's units (AMX: the tile state);
 *   attn_scores(qa, q_ld, rows, kp, dc, jn, sbuf, nkp): S for the block's `rows` query rows
 *     (bf16, row i at qa + i * q_ld; 16 readable rows, zeros past `rows`) against key blocks
 *     0..jn-1, into sbuf (float32, row stride nkp; rows past `rows` may be left unwritten);
 *   attn_pv(pbuf, nkp, vp, dn, rows, obuf, D): O = P V for the block's `rows` rows (P bf16,
 *     16 rows of stride nkp, zeros past `rows`; nkp keys, a multiple of 32) into obuf
 *     (float32, 16 rows of stride D).
 * (ATTN_KEY_PAD: keys the packed K and V are padded to, zeros past the chunk's.)
 */
#ifndef SCALELLM_ATTENTION_COMMON_H
#define SCALELLM_ATTENTION_COMMON_H

#include "avx512_common.h"

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Row of key n of a chunk in k/v: through its index, or kbase + n without one. */
static inline int64_t key_row(const int64_t *kidx, int64_t kbase, int n) { return kidx ? kidx[n] : kbase + n; }

/* K of keys 0..nkeys-1 (zeros past L) of KV head g, packed in 16-key blocks of dim pairs. */
static void pack_k(uint16_t *kp, const uint16_t *k, int64_t k_rs, const int64_t *kidx, int64_t kbase, int g,
                   int D, int L, int nkeys) {
    const int dc = D / 32;
    for (int j = 0; j < nkeys / 16; j++) {
        for (int c = 0; c < dc; c++) {
            uint32_t *dst = (uint32_t *)(kp + ((size_t)(j * dc + c)) * 512);
            for (int n = 0; n < 16; n++) {
                int key = 16 * j + n;
                if (key < L) {
                    const uint32_t *src = (const uint32_t *)(k + key_row(kidx, kbase, key) * k_rs + (int64_t)g * D + 32 * c);
                    for (int p = 0; p < 16; p++) dst[p * 16 + n] = src[p];
                } else {
                    for (int p = 0; p < 16; p++) dst[p * 16 + n] = 0;
                }
            }
        }
    }
}

/* V of keys 0..nkeys-1 (zeros past L) of KV head g, packed in 32-key chunks of key pairs. */
static void pack_v(uint16_t *vp, const uint16_t *v, int64_t v_rs, const int64_t *kidx, int64_t kbase, int g,
                   int D, int L, int nkeys) {
    const int dn = D / 16;
    for (int kc = 0; kc < nkeys / 32; kc++) {
        for (int b = 0; b < dn; b++) {
            uint16_t *dst = vp + ((size_t)(kc * dn + b)) * 512;
            for (int pr = 0; pr < 16; pr++) {
                int k0 = 32 * kc + 2 * pr, k1 = k0 + 1;
                const uint16_t *s0 = k0 < L ? v + key_row(kidx, kbase, k0) * v_rs + (int64_t)g * D + 16 * b : NULL;
                const uint16_t *s1 = k1 < L ? v + key_row(kidx, kbase, k1) * v_rs + (int64_t)g * D + 16 * b : NULL;
                __m256i a = s0 ? _mm256_loadu_si256((const __m256i *)s0) : _mm256_setzero_si256();
                __m256i bb = s1 ? _mm256_loadu_si256((const __m256i *)s1) : _mm256_setzero_si256();
                // interleave 16-bit elements of a and bb: d0a d0b d1a d1b ...
                __m256i lo = _mm256_unpacklo_epi16(a, bb);  // within 128-bit lanes
                __m256i hi = _mm256_unpackhi_epi16(a, bb);
                _mm256_storeu_si256((__m256i *)(dst + pr * 32), _mm256_permute2x128_si256(lo, hi, 0x20));
                _mm256_storeu_si256((__m256i *)(dst + pr * 32 + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
            }
        }
    }
}

/* P (bf16, zeros past each row's last visible key, up to nkp) and 1 / row sum of 16 rows of
 * scores; row r < rows sees keys 0..p0 + r. */
static void causal_softmax(const float *sbuf, uint16_t *pbuf, int nkp, int rows, int p0, float scale, float *rowinv) {
    for (int r = 0; r < 16; r++) {
        const float *srow = sbuf + r * nkp;
        uint16_t *prow = pbuf + r * nkp;
        const int valid = r < rows ? p0 + r + 1 : 0;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int c0 = 0; c0 < valid; c0 += 16) {
            __mmask16 m = valid - c0 >= 16 ? 0xFFFF : (__mmask16)((1u << (valid - c0)) - 1);
            mx = _mm512_mask_max_ps(mx, m, mx, _mm512_loadu_ps(srow + c0));
        }
        const float mrow = valid ? _mm512_reduce_max_ps(mx) * scale : 0.0f;
        const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(mrow);
        __m512 sum = _mm512_setzero_ps();
        for (int c0 = 0; c0 < nkp; c0 += 16) {
            int left = valid - c0;
            __mmask16 m = left >= 16 ? 0xFFFF : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1));
            __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, srow + c0), vs, vm)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(prow + c0), to_bf16(e));
        }
        const float tot = _mm512_reduce_add_ps(sum);
        rowinv[r] = tot > 0 ? 1.0f / tot : 0.0f;
    }
}

static void attn_thread_begin(void);
static void attn_thread_end(void);
static void attn_scores(const uint16_t *qa, int64_t q_ld, int rows, const uint16_t *kp, int dc, int jn, float *sbuf,
                        int nkp);
static void attn_pv(const uint16_t *pbuf, int nkp, const uint16_t *vp, int dn, int rows, float *obuf, int D);

/* n_seq query chunks. Chunk s: query rows [q_starts[s], q_starts[s] + q_lens[s]), the last
 * q_lens[s] positions of a context of ctx_lens[s] keys; its key n lies in row
 * kv_index[kv_offs[s] + n] of k and v (row kv_offs[s] + n without an index). Query i sees keys
 * 0 .. ctx_lens[s] - q_lens[s] + i. max_ctx >= every ctx_lens[s].
 * Returns 0, or -1 where a thread could not allocate its scratch (then `out` is incomplete). */
int sl_causal_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                        int64_t q_rs, int64_t k_rs, int64_t v_rs, int64_t o_rs, int n_seq,
                        const int64_t *q_starts, const int64_t *q_lens, const int64_t *ctx_lens,
                        const int64_t *kv_index, const int64_t *kv_offs, int H, int Hkv, int D, float scale,
                        int max_ctx, int num_threads) {
    const int G = H / Hkv;
    const int n_units = n_seq * Hkv;
    const int lpad = (max_ctx + ATTN_KEY_PAD - 1) / ATTN_KEY_PAD * ATTN_KEY_PAD;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        // per thread scratch
        uint16_t *kp = aligned_alloc(64, (size_t)lpad * D * 2);  // K, dim pairs
        uint16_t *vp = aligned_alloc(64, (size_t)lpad * D * 2);  // V, key pairs
        float *sbuf = aligned_alloc(64, (size_t)16 * lpad * 4);     // scores of a q block
        uint16_t *pbuf = aligned_alloc(64, (size_t)16 * lpad * 2);  // probabilities, bf16
        float *obuf = aligned_alloc(64, (size_t)16 * 128 * 4);
        uint16_t *qpad = aligned_alloc(64, (size_t)16 * 128 * 2);
        float rowinv[16];
        const int ok = kp && vp && sbuf && pbuf && obuf && qpad;
        if (ok)
            attn_thread_begin();
        else {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int u = 0; u < n_units; u++) {
            if (!ok)
                continue;  /* this thread's units stay undone: the caller sees the failure */
            const int s = u / Hkv, g = u % Hkv;
            const int64_t r0 = q_starts[s];
            const int QL = (int)q_lens[s];
            const int L = (int)ctx_lens[s];         // keys
            const int past = L - QL;                // keys before the first query
            const int64_t *kidx = kv_index ? kv_index + kv_offs[s] : NULL;
            const int nkeys = (L + ATTN_KEY_PAD - 1) / ATTN_KEY_PAD * ATTN_KEY_PAD;
            const int nqb = (QL + 15) / 16;         // 16-query blocks
            pack_k(kp, k, k_rs, kidx, kv_offs[s], g, D, L, nkeys);
            pack_v(vp, v, v_rs, kidx, kv_offs[s], g, D, L, nkeys);
            for (int hh = 0; hh < G; hh++) {
                const int h = g * G + hh;
                for (int i = 0; i < nqb; i++) {
                    const int rows = QL - 16 * i < 16 ? QL - 16 * i : 16;
                    const int p0 = past + 16 * i;  // the block's first query position
                    const uint16_t *qa;
                    int64_t q_ld;
                    if (rows == 16) {
                        qa = q + (r0 + 16 * i) * q_rs + (int64_t)h * D;
                        q_ld = q_rs;
                    } else {
                        memset(qpad, 0, 16 * D * 2);
                        for (int r = 0; r < rows; r++)
                            memcpy(qpad + r * D, q + (r0 + 16 * i + r) * q_rs + (int64_t)h * D, D * 2);
                        qa = qpad;
                        q_ld = D;
                    }
                    const int last = p0 + rows - 1 < L - 1 ? p0 + rows - 1 : L - 1;  // its last key
                    const int jn = last / 16 + 1;     // key blocks it needs
                    const int nkp = (16 * jn + 31) & ~31;  // padded to a chunk of 32 keys
                    attn_scores(qa, q_ld, rows, kp, D / 32, jn, sbuf, nkp);
                    causal_softmax(sbuf, pbuf, nkp, rows, p0, scale, rowinv);
                    attn_pv(pbuf, nkp, vp, D / 16, rows, obuf, D);
                    for (int r = 0; r < rows; r++) {
                        uint16_t *orow = out + (r0 + 16 * i + r) * o_rs + (int64_t)h * D;
                        const __m512 inv = _mm512_set1_ps(rowinv[r]);
                        for (int d0 = 0; d0 < D; d0 += 16)
                            _mm256_storeu_si256((__m256i *)(orow + d0), to_bf16(_mm512_mul_ps(_mm512_loadu_ps(obuf + r * D + d0), inv)));
                    }
                }
            }
        }
        if (ok)
            attn_thread_end();
        free(kp); free(vp); free(sbuf); free(pbuf); free(obuf); free(qpad);
    }
    return failed ? -1 : 0;
}

#endif
