/*
 * The register blocking of the two GEMMs without AMX (vnni_gemm.c: int8 codes on VPDPBUSD;
 * bf16_gemm.c: bf16 on VDPBF16PS). W is packed in blocks of NR = 64 output channels; a step
 * of K (a quad of int8 codes or a pair of bf16 values: 4 bytes a channel) is 256 bytes of a
 * block, 4 registers. A strip of up to MR = 6 rows keeps its 6 x 64 sums in 24 named
 * registers and, per step, loads the block's 4 registers and broadcasts each row's 4 bytes:
 * 24 dot-product instructions a step. Named registers and a constant row count: with an
 * array of them, gcc 12 kept copies of the sums on the stack inside the loop (half the speed).
 *
 * The includer defines first: GB_ACC (the sums' vector type) and GB_SUM (their scalar),
 * GB_ZERO() (a zero GB_ACC), GB_DP(a, x, w) (a plus the lanes' dot products of the row's
 * broadcast step x and the weights w, both __m512i), GB_STORE(p, a) (to 64-byte aligned p);
 * and gets `strip_sums(rows, x32, ld32, wb, steps, acc)`: the sums of `rows` (1..MR) rows,
 * row m's step s at x32[m * ld32 + s], against block wb (steps x 256 bytes), into acc [MR][NR].
 */
#ifndef SCALELLM_GEMM_BLOCKS_H
#define SCALELLM_GEMM_BLOCKS_H

#include <immintrin.h>
#include <stdint.h>

#define NR 64 /* output channels of a block: 4 registers of 16 */
#define MR 6  /* rows of a strip */

#define GB_ROW_ZERO(m) GB_ACC a##m##0 = GB_ZERO(), a##m##1 = a##m##0, a##m##2 = a##m##0, a##m##3 = a##m##0;
#define GB_ROW_DP(m)                                                               \
    if (M > m) {                                                                   \
        const __m512i xb = _mm512_set1_epi32(x32[m * ld32 + s]);                   \
        a##m##0 = GB_DP(a##m##0, xb, w0);                                          \
        a##m##1 = GB_DP(a##m##1, xb, w1);                                          \
        a##m##2 = GB_DP(a##m##2, xb, w2);                                          \
        a##m##3 = GB_DP(a##m##3, xb, w3);                                          \
    }
#define GB_ROW_STORE(m)                                                            \
    if (M > m) {                                                                   \
        GB_STORE(acc + m * NR, a##m##0);                                           \
        GB_STORE(acc + m * NR + 16, a##m##1);                                      \
        GB_STORE(acc + m * NR + 32, a##m##2);                                      \
        GB_STORE(acc + m * NR + 48, a##m##3);                                      \
    }

static inline __attribute__((always_inline)) void gb_strip(const int32_t *x32, int64_t ld32, const void *wb,
                                                           int64_t steps, GB_SUM *acc, const int M) {
    GB_ROW_ZERO(0) GB_ROW_ZERO(1) GB_ROW_ZERO(2) GB_ROW_ZERO(3) GB_ROW_ZERO(4) GB_ROW_ZERO(5)
    for (int64_t s = 0; s < steps; s++) {
        const __m512i *ws = (const __m512i *)((const char *)wb + s * 256);
        const __m512i w0 = _mm512_load_si512(ws), w1 = _mm512_load_si512(ws + 1);
        const __m512i w2 = _mm512_load_si512(ws + 2), w3 = _mm512_load_si512(ws + 3);
        GB_ROW_DP(0) GB_ROW_DP(1) GB_ROW_DP(2) GB_ROW_DP(3) GB_ROW_DP(4) GB_ROW_DP(5)
    }
    GB_ROW_STORE(0) GB_ROW_STORE(1) GB_ROW_STORE(2) GB_ROW_STORE(3) GB_ROW_STORE(4) GB_ROW_STORE(5)
}

#define GB_STRIP_OF(m)                                                                                       \
    static __attribute__((noinline)) void gb_strip_##m(const int32_t *x32, int64_t ld32, const void *wb,      \
                                                       int64_t steps, GB_SUM *acc) {                         \
        gb_strip(x32, ld32, wb, steps, acc, m);                                                              \
    }
GB_STRIP_OF(1) GB_STRIP_OF(2) GB_STRIP_OF(3) GB_STRIP_OF(4) GB_STRIP_OF(5) GB_STRIP_OF(6)

static void strip_sums(int64_t rows, const int32_t *x32, int64_t ld32, const void *wb, int64_t steps, GB_SUM *acc) {
    switch (rows) {  /* constant row counts */
        case 1: gb_strip_1(x32, ld32, wb, steps, acc); break;
        case 2: gb_strip_2(x32, ld32, wb, steps, acc); break;
        case 3: gb_strip_3(x32, ld32, wb, steps, acc); break;
        case 4: gb_strip_4(x32, ld32, wb, steps, acc); break;
        case 5: gb_strip_5(x32, ld32, wb, steps, acc); break;
        default: gb_strip_6(x32, ld32, wb, steps, acc); break;
    }
}

#endif
