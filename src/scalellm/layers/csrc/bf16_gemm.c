/*
 * bf16 GEMM on AVX-512 BF16 (VDPBF16PS, no AMX needed): out = x W^T (+ bias), any number of
 * rows, float32 sums rounded once to bf16 (nearest even) or kept as float32.
 *
 * Compiled at run time by layers/bf16_gemm.py and called through ctypes. W is packed once in
 * blocks of 64 output channels: block b, pair p of K holds channels 64b..64b+63, each with its
 * 2 values k = 2p, 2p+1 (256 bytes, 4 registers), N padded with zero channels to a multiple
 * of 64, K even. Each OpenMP thread takes a contiguous range of (channel block, strip of 6
 * rows) units; a unit keeps 6 x 64 float32 sums in 24 registers and, per pair of K, loads the
 * block's 4 registers and broadcasts each row's pair (24 VDPBF16PS a pair). The same shape as
 * vnni_gemm.c, whose note on gcc and register arrays applies here too.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define NR 64 /* output channels of a block: 4 registers of 16 */
#define MR 6  /* rows of a strip */

#define ROW_DP(m)                                                                  \
    if (M > m) {                                                                   \
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(x32[m * ld32 + p]);        \
        a##m##0 = _mm512_dpbf16_ps(a##m##0, xb, w0);                               \
        a##m##1 = _mm512_dpbf16_ps(a##m##1, xb, w1);                               \
        a##m##2 = _mm512_dpbf16_ps(a##m##2, xb, w2);                               \
        a##m##3 = _mm512_dpbf16_ps(a##m##3, xb, w3);                               \
    }
#define ROW_ZERO(m) __m512 a##m##0 = _mm512_setzero_ps(), a##m##1 = a##m##0, a##m##2 = a##m##0, a##m##3 = a##m##0;
#define ROW_STORE(m)                                                               \
    if (M > m) {                                                                   \
        _mm512_store_ps(acc + m * NR, a##m##0);                                    \
        _mm512_store_ps(acc + m * NR + 16, a##m##1);                               \
        _mm512_store_ps(acc + m * NR + 32, a##m##2);                               \
        _mm512_store_ps(acc + m * NR + 48, a##m##3);                               \
    }

/* sums of M (1..MR) rows (row m's pair p at x32[m * ld32 + p]) against block wb, into acc */
static inline __attribute__((always_inline)) void strip_sums(const int32_t *x32, int64_t ld32, const uint16_t *wb,
                                                             int64_t kp, float *acc, const int M) {
    ROW_ZERO(0) ROW_ZERO(1) ROW_ZERO(2) ROW_ZERO(3) ROW_ZERO(4) ROW_ZERO(5)
    for (int64_t p = 0; p < kp; p++) {
        const __m512i *wq = (const __m512i *)(wb + p * 128);
        const __m512bh w0 = (__m512bh)_mm512_load_si512(wq), w1 = (__m512bh)_mm512_load_si512(wq + 1);
        const __m512bh w2 = (__m512bh)_mm512_load_si512(wq + 2), w3 = (__m512bh)_mm512_load_si512(wq + 3);
        ROW_DP(0) ROW_DP(1) ROW_DP(2) ROW_DP(3) ROW_DP(4) ROW_DP(5)
    }
    ROW_STORE(0) ROW_STORE(1) ROW_STORE(2) ROW_STORE(3) ROW_STORE(4) ROW_STORE(5)
}

#define STRIP_OF(m)                                                                                          \
    static __attribute__((noinline)) void strip_##m(const int32_t *x32, int64_t ld32, const uint16_t *wb,     \
                                                    int64_t kp, float *acc) {                                 \
        strip_sums(x32, ld32, wb, kp, acc, m);                                                               \
    }
STRIP_OF(1) STRIP_OF(2) STRIP_OF(3) STRIP_OF(4) STRIP_OF(5) STRIP_OF(6)

/* out rows 0..M-1, channels n0..n0+63 (those below N) from the strip's sums (+ bias) */
static void strip_out(const float *acc, int M, const float *bias, int64_t n0, int64_t N, void *out, int64_t ldo,
                      int out32) {
    for (int j = 0; j < 4; j++) {
        const int64_t n = n0 + 16 * j;
        if (n >= N)
            break;
        const __mmask16 mask = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
        for (int m = 0; m < M; m++) {
            const __m512 v = _mm512_add_ps(_mm512_load_ps(acc + m * NR + 16 * j), bv);
            if (out32)
                _mm512_mask_storeu_ps((float *)out + m * ldo + n, mask, v);
            else
                _mm256_mask_storeu_epi16((uint16_t *)out + m * ldo + n, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

/* x [M, K] bf16 (row stride ldx, 4-byte aligned rows), W packed (see above), bias [N]
 * float32 or NULL -> out [M, N] (row stride ldo) bf16 or float32 (out32). K even. */
void sl_gemm_bf16(const uint16_t *x, int64_t ldx, int64_t M, const uint16_t *wp, const float *bias, int64_t N,
                  int64_t K, void *out, int64_t ldo, int out32, int num_threads) {
    const int64_t nblocks = (N + NR - 1) / NR, strips = (M + MR - 1) / MR, units = nblocks * strips;
#pragma omp parallel num_threads(num_threads)
    {
        float acc[MR * NR] __attribute__((aligned(64)));
        /* contiguous ranges of units, channel block major: a thread keeps its blocks' weights */
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            const int64_t b = u / strips, s = u % strips;
            const int64_t m0 = s * MR, rows = M - m0 < MR ? M - m0 : MR;
            const uint16_t *wb = wp + b * NR * K;
            const int32_t *x32 = (const int32_t *)(x + m0 * ldx);
            void *o = out32 ? (void *)((float *)out + m0 * ldo) : (void *)((uint16_t *)out + m0 * ldo);
            switch (rows) {  /* constant row counts */
                case 1: strip_1(x32, ldx / 2, wb, K / 2, acc); break;
                case 2: strip_2(x32, ldx / 2, wb, K / 2, acc); break;
                case 3: strip_3(x32, ldx / 2, wb, K / 2, acc); break;
                case 4: strip_4(x32, ldx / 2, wb, K / 2, acc); break;
                case 5: strip_5(x32, ldx / 2, wb, K / 2, acc); break;
                default: strip_6(x32, ldx / 2, wb, K / 2, acc); break;
            }
            strip_out(acc, (int)rows, bias, b * NR, N, o, ldo, out32);
        }
    }
}
