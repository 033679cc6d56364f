/*
 * Causal self-attention of prefill chunks on Intel AMX (bf16 tiles, float32 softmax).
 *
 * Compiled at run time by layers/causal_attention_amx.py (gcc or clang) and called through
 * ctypes; the torch SDPA path stays wherever this is missing. One call covers every prefill
 * chunk of a step, whatever their lengths: fresh prompts, and chunks that continue a cached
 * context (their keys read through a row index, e.g. the KV cache's slots). The unit of work
 * is (chunk, KV head), split over `num_threads` OpenMP threads. Per unit, K is packed as the
 * B operand of Q K^T and V as the B operand of P V (VNNI pairs); then for each query head of
 * the group and each block of 16 query rows:
 *   S = Q K^T over the key blocks the block's rows may see (causal), float32 tiles;
 *   P = exp(scale * S - row max) with the causal mask, float32, rounded to bf16;
 *   O = P V in float32 tiles, divided by the row sums, rounded to bf16 into `out`.
 * Why: torch's CPU flash kernel cuts 128-token prompts into 32-row query blocks, ~2,300
 * small GEMMs a layer at SmolLM2's shapes (3.3-4.2 ms a layer for 32 x 128 tokens, 1.5-1.7
 * here), and a chunk over a cached context runs as its own masked call.
 *
 * Layout: bf16 bits as uint16. Query row r, head h at q + r * q_rs + h * D; key (value) row
 * r, KV head g at k + r * k_rs + g * D (v + r * v_rs + g * D); output at out + r * o_rs +
 * h * D. Head h reads KV head h / (H / Hkv). D: a multiple of 32, at most 128.
 */
#include "amx_common.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <unistd.h>
#include <sys/syscall.h>

static void config_tiles(void) {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
}

/* Row of key n of a chunk in k/v: through its index, or kbase + n without one. */
static inline int64_t key_row(const int64_t *kidx, int64_t kbase, int n) { return kidx ? kidx[n] : kbase + n; }

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
    const int lpad = (max_ctx + 31) & ~31;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        // per thread scratch
        uint16_t *kp = aligned_alloc(64, (size_t)lpad * D * 2);  // K^T in VNNI B tiles
        uint16_t *vp = aligned_alloc(64, (size_t)lpad * D * 2);  // V in VNNI B tiles
        float *sbuf = aligned_alloc(64, (size_t)16 * lpad * 4);     // scores of a q block
        uint16_t *pbuf = aligned_alloc(64, (size_t)16 * lpad * 2);  // probabilities, bf16
        float *obuf = aligned_alloc(64, (size_t)16 * 128 * 4);
        uint16_t *qpad = aligned_alloc(64, (size_t)16 * 128 * 2);
        float rowinv[16];
        const int ok = kp && vp && sbuf && pbuf && obuf && qpad;
        if (ok)
            config_tiles();
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
            const int64_t kbase = kv_offs[s];
            const int nkb = (L + 15) / 16;          // 16-key blocks
            const int nkc = (L + 31) / 32;          // 32-key chunks
            const int nqb = (QL + 15) / 16;         // 16-query blocks
            const int dc = D / 32;                  // D chunks of 32 (QK^T K-dim)
            const int dn = D / 16;                  // D blocks of 16 (PV N-dim)
            // pack K: tile (j, c): row p (0..15) = pair (32c + 2p, 32c + 2p + 1), col n = key 16j + n
            for (int j = 0; j < nkb; j++) {
                for (int c = 0; c < dc; c++) {
                    uint32_t *dst = (uint32_t *)(kp + ((size_t)(j * dc + c)) * 512);
                    for (int n = 0; n < 16; n++) {
                        int key = 16 * j + n;
                        if (key < L) {
                            const uint32_t *src =
                                (const uint32_t *)(k + key_row(kidx, kbase, key) * k_rs + (int64_t)g * D + 32 * c);
                            for (int p = 0; p < 16; p++) dst[p * 16 + n] = src[p];
                        } else {
                            for (int p = 0; p < 16; p++) dst[p * 16 + n] = 0;
                        }
                    }
                }
            }
            // pack V: tile (kc, b): row kp (0..15) = keys (32kc + 2kp, +1), col d (0..15) = 16b + d, pairs
            for (int kc = 0; kc < nkc; kc++) {
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
                        __m256i o0 = _mm256_permute2x128_si256(lo, hi, 0x20);
                        __m256i o1 = _mm256_permute2x128_si256(lo, hi, 0x31);
                        _mm256_storeu_si256((__m256i *)(dst + pr * 32), o0);
                        _mm256_storeu_si256((__m256i *)(dst + pr * 32 + 16), o1);
                    }
                }
            }
            for (int hh = 0; hh < G; hh++) {
                const int h = g * G + hh;
                for (int i = 0; i < nqb; i++) {
                    const int rows = QL - 16 * i < 16 ? QL - 16 * i : 16;
                    const int p0 = past + 16 * i;  // the block's first query position
                    const uint16_t *qa;
                    int64_t qstride;
                    if (rows == 16) {
                        qa = q + (r0 + 16 * i) * q_rs + (int64_t)h * D;
                        qstride = q_rs * 2;
                    } else {
                        memset(qpad, 0, 16 * D * 2);
                        for (int r = 0; r < rows; r++)
                            memcpy(qpad + r * D, q + (r0 + 16 * i + r) * q_rs + (int64_t)h * D, D * 2);
                        qa = qpad;
                        qstride = D * 2;
                    }
                    const int last = p0 + rows - 1 < L - 1 ? p0 + rows - 1 : L - 1;  // its last key
                    const int jn = last / 16 + 1;     // key blocks it needs
                    const int nk = 16 * jn;
                    const int nkp = (nk + 31) & ~31;  // padded to the PV chunk
                    // S = Q K^T for key blocks 0..jn-1
                    for (int j = 0; j < jn; j++) {
                        _tile_zero(0);
                        for (int c = 0; c < dc; c++) {
                            _tile_loadd(1, qa + 32 * c, qstride);
                            _tile_loadd(2, kp + ((size_t)(j * dc + c)) * 512, 64);
                            _tile_dpbf16ps(0, 1, 2);
                        }
                        _tile_stored(0, sbuf + 16 * j, nkp * 4);
                    }
                    // softmax per row (causal: row r sees keys 0..p0 + r)
                    for (int r = 0; r < 16; r++) {
                        float *srow = sbuf + r * nkp;
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
                            __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_fmsub_ps(_mm512_loadu_ps(srow + c0), vs, vm)));
                            sum = _mm512_add_ps(sum, e);
                            _mm256_storeu_si256((__m256i *)(prow + c0), to_bf16(e));
                        }
                        const float tot = _mm512_reduce_add_ps(sum);
                        rowinv[r] = tot > 0 ? 1.0f / tot : 0.0f;
                    }
                    // O = P V, D in halves of up to 64 (4 C tiles)
                    for (int b0 = 0; b0 < dn; b0 += 4) {
                        const int nb = dn - b0 < 4 ? dn - b0 : 4;
                        _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
                        for (int kc = 0; kc < nkp / 32; kc++) {
                            _tile_loadd(1, pbuf + 32 * kc, nkp * 2);
                            _tile_loadd(2, vp + ((size_t)(kc * dn + b0)) * 512, 64);
                            _tile_dpbf16ps(4, 1, 2);
                            if (nb > 1) { _tile_loadd(3, vp + ((size_t)(kc * dn + b0 + 1)) * 512, 64); _tile_dpbf16ps(5, 1, 3); }
                            if (nb > 2) { _tile_loadd(2, vp + ((size_t)(kc * dn + b0 + 2)) * 512, 64); _tile_dpbf16ps(6, 1, 2); }
                            if (nb > 3) { _tile_loadd(3, vp + ((size_t)(kc * dn + b0 + 3)) * 512, 64); _tile_dpbf16ps(7, 1, 3); }
                        }
                        _tile_stored(4, obuf + 16 * b0, D * 4);
                        if (nb > 1) _tile_stored(5, obuf + 16 * (b0 + 1), D * 4);
                        if (nb > 2) _tile_stored(6, obuf + 16 * (b0 + 2), D * 4);
                        if (nb > 3) _tile_stored(7, obuf + 16 * (b0 + 3), D * 4);
                    }
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
            _tile_release();
        free(kp); free(vp); free(sbuf); free(pbuf); free(obuf); free(qpad);
    }
    return failed ? -1 : 0;
}
