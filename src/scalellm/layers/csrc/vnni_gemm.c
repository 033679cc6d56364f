/*
 * int8 GEMM on AVX-512 VNNI (no AMX needed): out = (codes W^T) * scales, for any number of
 * rows, on CPUs where torch._int_mm is otherwise the int8 GEMM (AMD Zen 4).
 *
 * Compiled at run time by layers/int_mm_backend.py and called through ctypes. Why: on a
 * 2-core Zen 4, torch._int_mm ran SmolLM2's linears at 64 rows (a c=64 decode step) at
 * ~350-400 GOP/s, no faster than the bf16 GEMM, and at 1 row read the weights at 6-11 GB/s.
 *
 * W is packed once (`pack` in the Python module) in blocks of 64 output channels: block b,
 * quad q of K holds channels 64b..64b+63, each with its 4 codes k = 4q..4q+3 (256 bytes, 4
 * registers), N padded with zero channels to a multiple of 64, K a multiple of 4. Each
 * OpenMP thread takes a contiguous range of (channel block, strip of 6 rows) units, each
 * blocked as gemm_blocks.h says (6 x 64 int32 sums in registers). VPDPBUSD multiplies unsigned by
 * signed bytes, so the codes x (signed) go in as x + 128 (XOR 0x80, once per call) and each
 * sum is corrected by 128 * sum_k W[n][k] (`corr`, made at packing): exact integers. Each
 * output is float32(sum) * scales[n], rounded once to bf16 (nearest even) or kept as
 * float32: what torch._int_mm followed by the channel scales computes.
 */
#define GB_ACC __m512i
#define GB_SUM int32_t
#define GB_ZERO() _mm512_setzero_si512()
#define GB_DP(a, x, w) _mm512_dpbusd_epi32(a, x, w)
#define GB_STORE(p, a) _mm512_store_si512((void *)(p), a)
#include "gemm_blocks.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* 16 float32 -> bf16 bits, nearest even (no NaN here), with AVX-512F only */
static inline __m256i bf16_of(__m512 v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* out rows 0..M-1, channels n0..n0+63 (those below N) from the strip's sums */
static void strip_out(const int32_t *acc, int M, const int32_t *corr, const float *scales, int64_t n0, int64_t N,
                      void *out, int64_t ldo, int out32) {
    for (int j = 0; j < 4; j++) {
        const int64_t n = n0 + 16 * j;
        if (n >= N)
            break;
        const __mmask16 mask = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
        const __m512i c = _mm512_loadu_si512((const void *)(corr + n));
        const __m512 s = _mm512_loadu_ps(scales + n);
        for (int m = 0; m < M; m++) {
            const __m512i a = _mm512_load_si512((const void *)(acc + m * NR + 16 * j));
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a, c)), s);
            if (out32)
                _mm512_mask_storeu_ps((float *)out + m * ldo + n, mask, v);
            else
                _mm256_mask_storeu_epi16((uint16_t *)out + m * ldo + n, mask, bf16_of(v));
        }
    }
}

/* codes [M, K] int8 (row stride lda), W packed (see above) with Np = N rounded up to 64,
 * corr [Np] int32 (128 * each channel's code sum), scales [Np] float32 -> out [M, N] (row
 * stride ldo) bf16 or float32 (out32). K a multiple of 4. Returns 0, or -1 if out of memory. */
int sl_gemm_s8(const int8_t *codes, int64_t lda, int64_t M, const int8_t *wp, const int32_t *corr, int64_t N,
               int64_t K, void *out, int64_t ldo, const float *scales, int out32, int num_threads) {
    uint8_t *xu = (uint8_t *)aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    if (!xu)
        return -1;
    const int64_t nblocks = (N + NR - 1) / NR, strips = (M + MR - 1) / MR, units = nblocks * strips;
#pragma omp parallel num_threads(num_threads)
    {
        int32_t acc[MR * NR] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const int8_t *src = codes + m * lda;
            uint8_t *dst = xu + m * K;
            int64_t kk = 0;
            for (; kk + 64 <= K; kk += 64)
                _mm512_storeu_si512((void *)(dst + kk),
                                    _mm512_xor_si512(_mm512_loadu_si512((const void *)(src + kk)), _mm512_set1_epi8((char)0x80)));
            for (; kk < K; kk++) dst[kk] = (uint8_t)(src[kk] ^ 0x80);  /* x + 128 */
        }
        /* contiguous ranges of units, channel block major: a thread keeps its blocks' weights */
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            const int64_t b = u / strips, s = u % strips;
            const int64_t m0 = s * MR, rows = M - m0 < MR ? M - m0 : MR;
            const int8_t *wb = wp + b * NR * K;
            const uint8_t *xs = xu + m0 * K;
            void *o = out32 ? (void *)((float *)out + m0 * ldo) : (void *)((uint16_t *)out + m0 * ldo);
            strip_sums(rows, (const int32_t *)xs, K / 4, wb, K / 4, acc);
            strip_out(acc, (int)rows, corr, scales, b * NR, N, o, ldo, out32);
        }
    }
    free(xu);
    return 0;
}
