/*
 * bf16 GEMV for few rows on AVX-512 BF16 (no AMX needed): out = x W^T (+ bias).
 *
 * Compiled at run time by layers/bf16_gemv.py and called through ctypes. For decode calls of
 * a few rows on CPUs without AMX (AMD Zen 4): there oneDNN's bf16 GEMM read SmolLM2's weights
 * at ~10 GB/s in one-row calls (its per-call cost and a kernel made for many rows), and a
 * decode step of one sequence is the reading of every weight once.
 *
 * W is the plain [N, K] bf16 weight, row-major; each OpenMP thread streams a contiguous range
 * of its rows once. VDPBF16PS multiplies pairs of bf16 and accumulates in float32; each output
 * is the float32 sum (+ bias) rounded once to bf16 (nearest even) or kept as float32.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define GEMV_ROW_GROUP 4  /* rows taken together: each weight line loaded once for them */

static inline uint16_t gemv_to_bf16(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    b += 0x7FFFu + ((b >> 16) & 1u);  /* round to nearest even (no NaN here) */
    return (uint16_t)(b >> 16);
}

/* this thread's channels [*n0, *n1) of N, inside a parallel region */
static inline void gemv_thread_range(int64_t N, int64_t *n0, int64_t *n1) {
    const int nth = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t per = (N + nth - 1) / nth;
    *n0 = me * per < N ? me * per : N;
    *n1 = *n0 + per < N ? *n0 + per : N;
}

static inline void rows_m(const uint16_t *x, int64_t ldx, int M, const uint16_t *w, int64_t n0, int64_t n1,
                          int64_t k, const float *bias, void *out, int64_t ldo, int out32) {
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *wr = w + n * k;
        __m512 acc[GEMV_ROW_GROUP];
        for (int m = 0; m < GEMV_ROW_GROUP; m++)
            acc[m] = _mm512_setzero_ps();
        for (int64_t kk = 0; kk < k; kk += 32) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(wr + kk));
            for (int m = 0; m < M; m++)
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512((const void *)(x + m * ldx + kk)), wv);
        }
        const float b = bias ? bias[n] : 0.0f;
        for (int m = 0; m < M; m++) {
            const float v = _mm512_reduce_add_ps(acc[m]) + b;
            if (out32)
                ((float *)out)[m * ldo + n] = v;
            else
                ((uint16_t *)out)[m * ldo + n] = gemv_to_bf16(v);
        }
    }
}

/* x [M, K] bf16 (row stride ldx), W [N, K] bf16, bias [N] float32 or NULL -> out [M, N]
 * (row stride ldo) bf16 or float32 (out32). K a multiple of 32; any M (GEMV_ROW_GROUP at a time). */
void sl_gemv_bf16(const uint16_t *x, int64_t ldx, int64_t M, const uint16_t *w, int64_t N, int64_t K,
                  const float *bias, void *out, int64_t ldo, int out32, int num_threads) {
    for (int64_t m0 = 0; m0 < M; m0 += GEMV_ROW_GROUP) {
        const int rows = (int)(M - m0 < GEMV_ROW_GROUP ? M - m0 : GEMV_ROW_GROUP);
        const uint16_t *xm = x + m0 * ldx;
        void *o = out32 ? (void *)((float *)out + m0 * ldo) : (void *)((uint16_t *)out + m0 * ldo);
#pragma omp parallel num_threads(num_threads)
        {
            int64_t n0, n1;
            gemv_thread_range(N, &n0, &n1);
            switch (rows) {  /* constant row counts: the m loops unroll */
                case 1: rows_m(xm, ldx, 1, w, n0, n1, K, bias, o, ldo, out32); break;
                case 2: rows_m(xm, ldx, 2, w, n0, n1, K, bias, o, ldo, out32); break;
                case 3: rows_m(xm, ldx, 3, w, n0, n1, K, bias, o, ldo, out32); break;
                default: rows_m(xm, ldx, 4, w, n0, n1, K, bias, o, ldo, out32); break;
            }
        }
    }
}
