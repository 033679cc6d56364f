/*
 * int8 GEMV for few rows on AVX-512 VNNI (no AMX needed): out = (codes W^T) * scales.
 *
 * Compiled at run time by layers/vnni_gemv.py and called through ctypes. For the int8-rows
 * chain's decode calls of few rows (up to 16) on CPUs where torch._int_mm is the int8 GEMM (AMD Zen 4):
 * there, one row through torch._int_mm read SmolLM2's int8 weights at ~6-11 GB/s (per-call
 * cost and a kernel made for many rows); this one at ~21 GB/s (the DRAM rate: ~25), and
 * a decode step of one sequence is the reading of every weight once.
 *
 * W stays as quantised, [N, K] int8 row-major (the codes torch._int_mm reads through a
 * transposed view): each OpenMP thread streams a contiguous range of its rows once. VPDPBUSD
 * multiplies unsigned by signed bytes, so the codes x (signed) go in as x + 128 and the
 * sum is corrected by 128 * sum_k W[n][k] (`wsum`, made at packing): exact integers.
 * Each output is float32(sum) * scales[n], rounded once to bf16 (nearest even) or kept as
 * float32: what torch._int_mm followed by the channel scales computes.
 */
#include "gemv_common.h"

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <omp.h>

static inline void put(void *out, int64_t ldo, int64_t m, int64_t n, float v, int out32) {
    if (out32)
        ((float *)out)[m * ldo + n] = v;
    else
        ((uint16_t *)out)[m * ldo + n] = gemv_to_bf16(v);
}

/* rows [n0, n1) of W against M (1..GEMV_ROW_GROUP) rows of unsigned codes xu (row stride k) */
static inline void rows_m(const uint8_t *xu, int M, const int8_t *w, const int32_t *wsum, int64_t n0, int64_t n1,
                          int64_t k, const float *scales, void *out, int64_t ldo, int out32) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * k;
        __m512i acc[GEMV_ROW_GROUP];
        for (int m = 0; m < GEMV_ROW_GROUP; m++)
            acc[m] = _mm512_setzero_si512();
        for (int64_t kk = 0; kk < k; kk += 64) {
            const __m512i wv = _mm512_loadu_si512((const void *)(wr + kk));
            for (int m = 0; m < M; m++)
                acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_loadu_si512((const void *)(xu + m * k + kk)), wv);
        }
        const int32_t corr = 128 * wsum[n];
        for (int m = 0; m < M; m++)
            put(out, ldo, m, n, (float)(_mm512_reduce_add_epi32(acc[m]) - corr) * scales[n], out32);
    }
}

/* codes [M, K] int8 (row stride lda), W [N, K] int8, wsum [N] int32, scales [N] float32 ->
 * out [M, N] (row stride ldo) bf16 or float32 (out32). K a multiple of 64; any M (taken
 * GEMV_ROW_GROUP at a time, for the few-row calls it is made for). Returns 0, or -1 if out of memory. */
int sl_gemv_s8(const int8_t *codes, int64_t lda, int64_t M, const int8_t *w, const int32_t *wsum, int64_t N,
               int64_t K, void *out, int64_t ldo, const float *scales, int out32, int num_threads) {
    uint8_t *xu = (uint8_t *)aligned_alloc(64, (size_t)(GEMV_ROW_GROUP * K));
    if (!xu)
        return -1;
    for (int64_t m0 = 0; m0 < M; m0 += GEMV_ROW_GROUP) {
        const int rows = (int)(M - m0 < GEMV_ROW_GROUP ? M - m0 : GEMV_ROW_GROUP);
        for (int m = 0; m < rows; m++)
            for (int64_t kk = 0; kk < K; kk++)
                xu[m * K + kk] = (uint8_t)(codes[(m0 + m) * lda + kk] ^ 0x80);  /* x + 128 */
        void *o = out32 ? (void *)((float *)out + m0 * ldo) : (void *)((uint16_t *)out + m0 * ldo);
#pragma omp parallel num_threads(num_threads)
        {
            int64_t n0, n1;
            gemv_thread_range(N, &n0, &n1);
            switch (rows) {  /* constant row counts: the m loops unroll */
                case 1: rows_m(xu, 1, w, wsum, n0, n1, K, scales, o, ldo, out32); break;
                case 2: rows_m(xu, 2, w, wsum, n0, n1, K, scales, o, ldo, out32); break;
                case 3: rows_m(xu, 3, w, wsum, n0, n1, K, scales, o, ldo, out32); break;
                default: rows_m(xu, 4, w, wsum, n0, n1, K, scales, o, ldo, out32); break;
            }
        }
    }
    free(xu);
    return 0;
}
