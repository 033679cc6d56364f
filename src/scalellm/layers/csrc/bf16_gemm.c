/*
 * bf16 GEMM on AVX-512 BF16 (VDPBF16PS, no AMX needed): out = x W^T (+ bias), any number of
 * rows, float32 sums rounded once to bf16 (nearest even) or kept as float32.
 *
 * Compiled at run time by layers/bf16_gemm.py and called through ctypes. W is packed once in
 * blocks of 64 output channels: block b, pair p of K holds channels 64b..64b+63, each with its
 * 2 values k = 2p, 2p+1 (256 bytes, 4 registers), N padded with zero channels to a multiple
 * of 64, K even. Each OpenMP thread takes a contiguous range of (channel block, strip of 6
 * rows) units, each blocked as gemm_blocks.h says (6 x 64 float32 sums in registers).
 *
 * SwiGLU (`sl_silu_mul_bf16`): a [gate | up] weight packed as one (gate's channels, then up's,
 * each half a whole number of blocks) gives silu(x gate^T) * (x up^T): a unit takes gate's
 * block b and up's block b, and its epilogue computes the activation and the product on the
 * float32 sums, rounded once to bf16; the [T, 2I] output is never written.
 */
#define GB_ACC __m512
#define GB_SUM float
#define GB_ZERO() _mm512_setzero_ps()
#define GB_DP(a, x, w) _mm512_dpbf16_ps(a, (__m512bh)(x), (__m512bh)(w))
#define GB_STORE(p, a) _mm512_store_ps(p, a)
#include "gemm_blocks.h"
#include "avx512_common.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

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
            strip_sums(rows, x32, ldx / 2, wb, K / 2, acc);
            strip_out(acc, (int)rows, bias, b * NR, N, o, ldo, out32);
        }
    }
}

/* x [M, K] bf16 (as for sl_gemm_bf16), W a [gate | up] weight of 2 * I channels packed (see
 * above), I a multiple of 64 -> out [M, I] (row stride ldo) bf16 = silu(x gate^T) * (x up^T). */
void sl_silu_mul_bf16(const uint16_t *x, int64_t ldx, int64_t M, const uint16_t *wp, int64_t I, int64_t K,
                      uint16_t *out, int64_t ldo, int num_threads) {
    const int64_t nblocks = I / NR, strips = (M + MR - 1) / MR, units = nblocks * strips;
#pragma omp parallel num_threads(num_threads)
    {
        float gate[MR * NR] __attribute__((aligned(64)));
        float up[MR * NR] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            const int64_t b = u / strips, s = u % strips;
            const int64_t m0 = s * MR, rows = M - m0 < MR ? M - m0 : MR;
            const int32_t *x32 = (const int32_t *)(x + m0 * ldx);
            strip_sums(rows, x32, ldx / 2, wp + b * NR * K, K / 2, gate);
            strip_sums(rows, x32, ldx / 2, wp + (nblocks + b) * NR * K, K / 2, up);
            for (int64_t m = 0; m < rows; m++)
                for (int j = 0; j < 4; j++) {
                    const __m512 g = _mm512_load_ps(gate + m * NR + 16 * j);
                    /* silu(g) = g / (1 + exp(-g)) */
                    const __m512 act = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
                    _mm256_storeu_si256((__m256i *)(out + (m0 + m) * ldo + b * NR + 16 * j),
                                        to_bf16(_mm512_mul_ps(act, _mm512_load_ps(up + m * NR + 16 * j))));
                }
        }
    }
}
