/*
 * bf16 GEMM on Intel AMX for linear layers: C = A W^T, W prepacked into AMX tiles.
 *
 * Compiled at run time by layers/amx_gemm.py (gcc or clang) and called through ctypes. Built
 * for the shapes serving meets: decode steps (1-64 rows), whose time is the weights' reading,
 * and prefill steps (thousands of rows). Measured against oneDNN's prepacked bf16 GEMM at
 * SmolLM2's layer shapes, 2 threads, weights out of L2: 1.3-2.3x faster at 1-256 rows, where
 * oneDNN reads weights at 10-15 GB/s and this reads them at 17-33.
 *
 * Weight layout (`pack` in amx_gemm.py): W [N, K] in blocks of 16 output columns; block b is
 * K/32 tiles of 1 KiB, tile t holding W[16b + n][32t + 2i + e] at [i][n][e] (the B operand
 * of TDPBF16PS: pairs of K, 16 columns). Blocks are taken two at a time ("pairs"): output
 * columns 32p .. 32p + 31 come from blocks 2p and 2p + 1.
 *
 * Work: the pairs are split over `num_threads` OpenMP threads in contiguous ranges, so each
 * thread streams its part of W once (the hardware prefetcher follows it; software prefetch,
 * into L1 or L2, a few tiles or a whole pair ahead, measured no better and mostly worse).
 * Rows go in blocks of ~768 KiB of A, at most ROW_BLOCK_MAX rows (A's block stays in L2
 * while the thread's pairs pass over it: at 4,096 rows, K = 1,536, 256-row blocks ran 10%
 * faster than 512 and 25% faster than 1,024; rows outer within ~1 MiB blocks of pairs, A's
 * tiles in L1, measured the same) and, within a block, 32 at a time: 2 x 2 tiles of C
 * accumulate over K (tmm0-3), with two A tiles (tmm4-5) and two B tiles (tmm6-7). The
 * accumulators go to a float32 buffer and out through the epilogue of `kind`:
 *   KIND_BF16:   C [M, N] bf16 (+ bias), rounded to nearest even
 *   KIND_FP32:   C [M, N] float32 (+ bias)
 *   KIND_SWIGLU: W packed as (gate block j, up block j) pairs; C [M, N/2] bf16 =
 *                silu(gate) * up, both from the float32 accumulators
 *   KIND_SPLIT:  the same packing, C [M, N] bf16 = [gate | up] (the plain product)
 * Outputs of at least STREAM_ROWS rows are written with non-temporal stores where a row's
 * 32 columns are one aligned cache line: a prefill step's output is larger than L2, and
 * reading each line before writing it cost gate_up at 4,096 rows 40% of its time.
 */
#include "amx_common.h"

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <omp.h>

#define KIND_BF16 0
#define KIND_FP32 1
#define KIND_SWIGLU 2
#define KIND_SPLIT 3

#define ROW_BLOCK_MAX 512
#define ROW_BLOCK_BYTES (768 * 1024)  // A's row block: kept in L2 (2 MiB a core) beside the pairs
#define STREAM_ROWS 512

/* Tiles for a group of ra0 + ra1 rows (ra0 <= 16, ra1 <= 16; ra1 = 0: one row tile). */
static void config_tiles(int ra0, int ra1) {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = (uint8_t)ra0;
    cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[4] = 64;
    if (ra1) {
        cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = (uint8_t)ra1;
        cfg.colsb[2] = cfg.colsb[3] = cfg.colsb[5] = 64;
    }
    cfg.rows[6] = cfg.rows[7] = 16;
    cfg.colsb[6] = cfg.colsb[7] = 64;
    _tile_loadconfig(&cfg);
}

/* Rows [r, r + rows) of pair p's 32 columns, from buf ([32][32] float32), into out. */
static void epilogue(const float *buf, int64_t r, int rows, int p, int kind, void *out, int64_t ldc,
                     int64_t half, const float *bias, int stream) {
    const __m512 b0 = bias ? _mm512_loadu_ps(bias + 32 * p) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_loadu_ps(bias + 32 * p + 16) : _mm512_setzero_ps();
    if (kind == KIND_BF16) {
        uint16_t *dst = (uint16_t *)out + r * ldc + 32 * p;
        // a row's 32 values: one 64-byte line (non-temporal where the output is large and aligned)
        const int nt = stream && ((uintptr_t)dst & 63) == 0 && ((ldc * 2) & 63) == 0;
        for (int i = 0; i < rows; i++, dst += ldc) {
            __m512 c0 = _mm512_load_ps(buf + 32 * i), c1 = _mm512_load_ps(buf + 32 * i + 16);
            if (bias) {
                c0 = _mm512_add_ps(c0, b0);
                c1 = _mm512_add_ps(c1, b1);
            }
            __m512i v = (__m512i)_mm512_cvtne2ps_pbh(c1, c0);
            if (nt)
                _mm512_stream_si512((__m512i *)dst, v);
            else
                _mm512_storeu_si512(dst, v);
        }
    } else if (kind == KIND_FP32) {
        float *dst = (float *)out + r * ldc + 32 * p;
        const int nt = stream && ((uintptr_t)dst & 63) == 0 && ((ldc * 4) & 63) == 0;
        for (int i = 0; i < rows; i++, dst += ldc) {
            __m512 c0 = _mm512_load_ps(buf + 32 * i), c1 = _mm512_load_ps(buf + 32 * i + 16);
            if (bias) {
                c0 = _mm512_add_ps(c0, b0);
                c1 = _mm512_add_ps(c1, b1);
            }
            if (nt) {
                _mm512_stream_ps(dst, c0);
                _mm512_stream_ps(dst + 16, c1);
            } else {
                _mm512_storeu_ps(dst, c0);
                _mm512_storeu_ps(dst + 16, c1);
            }
        }
    } else if (kind == KIND_SWIGLU) {
        uint16_t *dst = (uint16_t *)out + r * ldc + 16 * p;
        for (int i = 0; i < rows; i++, dst += ldc) {
            __m512 g = _mm512_load_ps(buf + 32 * i), u = _mm512_load_ps(buf + 32 * i + 16);
            // silu(g) = g / (1 + exp(-g))
            __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm256_storeu_si256((__m256i *)dst, to_bf16(_mm512_mul_ps(s, u)));
        }
    } else {  // KIND_SPLIT
        uint16_t *dst = (uint16_t *)out + r * ldc + 16 * p;
        for (int i = 0; i < rows; i++, dst += ldc) {
            _mm256_storeu_si256((__m256i *)dst, to_bf16(_mm512_load_ps(buf + 32 * i)));
            _mm256_storeu_si256((__m256i *)(dst + half), to_bf16(_mm512_load_ps(buf + 32 * i + 16)));
        }
    }
}

/* One 32 x 32 block: rows a0 (ra0 of them) and a0 + 16 lda (ra1), columns of w0 and w1 (a
 * pair's two 16-column panels), over all of K; the accumulators (float32, or int32 for s8)
 * into buf [32][32]. A K step is 64 bytes of a row of A and one 1 KiB tile of each panel
 * either way: 32 bf16 in pairs (TDPBF16PS) or 64 int8 in quads (TDPBSSD). s8 is a constant
 * where inlined, so each entry point gets its own loop. */
static inline __attribute__((always_inline)) void block32(const char *a0, int64_t lda, const char *w0,
                                                          const char *w1, int kt, int ra1, void *buf, const int s8) {
    const char *a1 = a0 + 16 * lda;
    _tile_zero(0);
    _tile_zero(1);
    if (ra1) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int t = 0; t < kt; t++) {
        _tile_loadd(4, a0 + 64 * t, lda);
        _tile_loadd(6, w0 + (size_t)t * 1024, 64);
        _tile_loadd(7, w1 + (size_t)t * 1024, 64);
        if (s8) {
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
        } else {
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (ra1) {
            _tile_loadd(5, a1 + 64 * t, lda);
            if (s8) {
                _tile_dpbssd(2, 5, 6);
                _tile_dpbssd(3, 5, 7);
            } else {
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
    }
    _tile_stored(0, buf, 128);
    _tile_stored(1, (char *)buf + 64, 128);
    if (ra1) {
        _tile_stored(2, (char *)buf + 16 * 128, 128);
        _tile_stored(3, (char *)buf + 16 * 128 + 64, 128);
    }
}

/* Tiles for rows [r, end): reconfigured only when the row count of the group changes. */
static inline int group_rows(int64_t r, int64_t end, int *cur0, int *cur1) {
    const int ra0 = end - r < 16 ? (int)(end - r) : 16;
    const int ra1 = end - r <= 16 ? 0 : (end - r - 16 < 16 ? (int)(end - r - 16) : 16);
    if (ra0 != *cur0 || ra1 != *cur1) {
        config_tiles(ra0, ra1);
        *cur0 = ra0;
        *cur1 = ra1;
    }
    return ra1;
}

/* The driver of both entry points: a [M, K] (rows lda bytes apart, kt K steps), w packed
 * (see the top; s8: int8 with w_scales [N] applied to the int32 accumulators first). */
static inline __attribute__((always_inline)) void gemm(const char *a, int64_t lda, int64_t m, const char *w, int n,
                                                       int kt, const int s8, const float *w_scales, int kind,
                                                       void *out, int64_t ldc, const float *bias, int num_threads) {
    const int pairs = n / 32;
    const int64_t half = n / 2;
    const int stream = m >= STREAM_ROWS;
    int64_t row_block = (ROW_BLOCK_BYTES / (64 * (int64_t)kt)) & ~(int64_t)31;
    row_block = row_block < 32 ? 32 : (row_block > ROW_BLOCK_MAX ? ROW_BLOCK_MAX : row_block);
    if (m <= 0 || pairs <= 0)
        return;
    if (num_threads > pairs)
        num_threads = pairs;
#pragma omp parallel num_threads(num_threads)
    {
        const int nth = omp_get_num_threads(), me = omp_get_thread_num();
        const int p0 = (int)((int64_t)pairs * me / nth), p1 = (int)((int64_t)pairs * (me + 1) / nth);
        float buf[32 * 32] __attribute__((aligned(64)));
        int cur0 = -1, cur1 = -1;
        for (int64_t mb = 0; mb < m; mb += row_block) {
            const int64_t mend = mb + row_block < m ? mb + row_block : m;
            for (int p = p0; p < p1; p++) {
                const char *w0 = w + (size_t)(2 * p) * kt * 1024, *w1 = w0 + (size_t)kt * 1024;
                for (int64_t r = mb; r < mend; r += 32) {
                    const int ra1 = group_rows(r, mend, &cur0, &cur1);
                    block32(a + r * lda, lda, w0, w1, kt, ra1, buf, s8);
                    if (s8) {  // int32 accumulators -> float32 times the channel scales, in place
                        const __m512 s0 = _mm512_loadu_ps(w_scales + 32 * p);
                        const __m512 s1 = _mm512_loadu_ps(w_scales + 32 * p + 16);
                        for (int i = 0; i < cur0 + ra1; i++) {
                            _mm512_store_ps(buf + 32 * i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(buf + 32 * i)), s0));
                            _mm512_store_ps(buf + 32 * i + 16,
                                            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(buf + 32 * i + 16)), s1));
                        }
                    }
                    epilogue(buf, r, cur0 + ra1, p, kind, out, ldc, half, bias, stream);
                }
            }
        }
        _tile_release();
        if (stream)
            _mm_sfence();  // this thread's non-temporal stores, before the caller reads them
    }
}

/*
 * a: [M, K] bf16, rows lda elements apart; w: packed [N, K] (see the top); out: rows ldc
 * elements apart (bf16 or float32 per kind); bias: [N] float32 or NULL (KIND_BF16/FP32).
 * N a multiple of 32, K of 32.
 */
void sl_gemm(const uint16_t *a, int64_t lda, int64_t m, const uint16_t *w, int n, int k, void *out,
             int64_t ldc, int kind, const float *bias, int num_threads) {
    gemm((const char *)a, 2 * lda, m, (const char *)w, n, k / 32, 0, NULL, kind, out, ldc, bias, num_threads);
}

/*
 * int8: codes [M, K] (one scale a row, applied by the caller) x int8 W [N, K]. W is packed
 * as the bf16 weights are, with 4 K values to a 32-bit lane: tile t of block b holds
 * W[16b + c][64t + 4i + e] at [i][c][e] (TDPBSSD's B operand), 16 rows x 64 bytes.
 * out [M, N] = float(A W^T) * w_scales[n], rounded to bf16 or float32 (oneDNN's qlinear with
 * an input scale of 1 and per-channel weight scales computes the same). K a multiple of 64;
 * lda and ldc in elements.
 */
void sl_gemm_s8(const int8_t *a, int64_t lda, int64_t m, const int8_t *w, int n, int k, void *out,
                int64_t ldc, const float *w_scales, int out_float32, int num_threads) {
    gemm((const char *)a, lda, m, (const char *)w, n, k / 64, 1, w_scales, out_float32 ? KIND_FP32 : KIND_BF16,
         out, ldc, NULL, num_threads);
}
