/*
 * Causal self-attention of prefill chunks on AVX-512 BF16 (VDPBF16PS), for CPUs without AMX
 * (AMD Zen 4, Intel Cooper Lake).
 *
 * Compiled at run time by layers/causal_attention_cpu.py (gcc or clang) and called through
 * ctypes; the torch SDPA path stays wherever this is missing. attention_common.h holds the
 * call, the work split, the packing and the softmax; here is how a block of query rows gets
 * its scores and its output, 4 rows by 4 blocks of 16 at a time in 16 float32 accumulators:
 *   S: VDPBF16PS of a query's dim pair (broadcast) against 16 keys' same pair (K packed in
 *      dim pairs), over D / 2 pairs;
 *   O: VDPBF16PS of a row's probability pair (broadcast) against the pair of keys' values of
 *      16 dims (V packed in key pairs), over the keys.
 * Why: on a 2-core Zen 4, torch's causal SDPA of 32 prompts of 128 tokens at SmolLM2's heads
 * takes ~14 ms a layer (~43 GFLOP/s), a fifth of a 4,096-token prefill step.
 */
#define ATTN_KEY_PAD 64  /* 4 key blocks of 16 at a time */
#include "attention_common.h"

#include <immintrin.h>
#include <stdint.h>

static void attn_thread_begin(void) {}
static void attn_thread_end(void) {}

static inline __m512bh pair_of(const uint16_t *p) { return (__m512bh)_mm512_set1_epi32(*(const int32_t *)p); }

/* S of 4 query rows (row r at qa + r * q_ld) against key blocks j0..j0+NB-1 */
static inline __attribute__((always_inline)) void scores_4(const uint16_t *qa, int64_t q_ld, const uint16_t *kp,
                                                           int dc, int j0, float *srow, int nkp, const int NB) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    for (int c = 0; c < dc; c++) {
        for (int p = 0; p < 16; p++) {
            __m512bh kv[4];
            for (int b = 0; b < NB; b++)
                kv[b] = (__m512bh)_mm512_load_si512((const void *)(kp + ((size_t)((j0 + b) * dc + c)) * 512 + p * 32));
            for (int r = 0; r < 4; r++) {
                const __m512bh qb = pair_of(qa + r * q_ld + 32 * c + 2 * p);
                for (int b = 0; b < NB; b++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], qb, kv[b]);
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < NB; b++) _mm512_storeu_ps(srow + r * nkp + 16 * (j0 + b), acc[r][b]);
}

static void attn_scores(const uint16_t *qa, int64_t q_ld, int rows, const uint16_t *kp, int dc, int jn, float *sbuf,
                        int nkp) {
    for (int r4 = 0; r4 < rows; r4 += 4) {
        const uint16_t *q4 = qa + r4 * q_ld;
        float *s4 = sbuf + r4 * nkp;
        int j0 = 0;
        for (; j0 + 4 <= jn; j0 += 4) scores_4(q4, q_ld, kp, dc, j0, s4, nkp, 4);
        switch (jn - j0) {
            case 3: scores_4(q4, q_ld, kp, dc, j0, s4, nkp, 3); break;
            case 2: scores_4(q4, q_ld, kp, dc, j0, s4, nkp, 2); break;
            case 1: scores_4(q4, q_ld, kp, dc, j0, s4, nkp, 1); break;
            default: break;
        }
    }
}

/* O of 4 rows (P row r at p4 + r * nkp), dims 16 * b0 .. 16 * (b0 + NB), over nkp keys */
static inline __attribute__((always_inline)) void pv_4(const uint16_t *p4, int nkp, const uint16_t *vp, int dn,
                                                       int b0, float *o4, int D, const int NB) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    for (int t = 0; t < nkp / 2; t++) {  /* key pairs */
        const uint16_t *vt = vp + ((size_t)((t >> 4) * dn + b0)) * 512 + (t & 15) * 32;
        __m512bh vv[4];
        for (int b = 0; b < NB; b++) vv[b] = (__m512bh)_mm512_load_si512((const void *)(vt + b * 512));
        for (int r = 0; r < 4; r++) {
            const __m512bh pb = pair_of(p4 + r * nkp + 2 * t);
            for (int b = 0; b < NB; b++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], pb, vv[b]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < NB; b++) _mm512_storeu_ps(o4 + r * D + 16 * (b0 + b), acc[r][b]);
}

static void attn_pv(const uint16_t *pbuf, int nkp, const uint16_t *vp, int dn, int rows, float *obuf, int D) {
    for (int r4 = 0; r4 < rows; r4 += 4)
        for (int b0 = 0; b0 < dn; b0 += 4) {  /* dn is even (D a multiple of 32) */
            if (dn - b0 >= 4)
                pv_4(pbuf + r4 * nkp, nkp, vp, dn, b0, obuf + r4 * D, D, 4);
            else
                pv_4(pbuf + r4 * nkp, nkp, vp, dn, b0, obuf + r4 * D, D, 2);
        }
}
