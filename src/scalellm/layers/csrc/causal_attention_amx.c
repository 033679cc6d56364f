/*
 * Causal self-attention of prefill chunks on Intel AMX (bf16 tiles, float32 softmax).
 *
 * Compiled at run time by layers/causal_attention_cpu.py (gcc or clang) and called through
 * ctypes; the torch SDPA path stays wherever this is missing. attention_common.h holds the
 * call, the work split, the packing (K as the B operand of Q K^T and V as the B operand of
 * P V, in VNNI pairs) and the softmax; here is how a block of 16 query rows gets its scores
 * (S = Q K^T in float32 tiles) and its output (O = P V in float32 tiles).
 * Why: torch's CPU flash kernel cuts 128-token prompts into 32-row query blocks, ~2,300
 * small GEMMs a layer at SmolLM2's shapes (3.3-4.2 ms a layer for 32 x 128 tokens, 1.5-1.7
 * here), and a chunk over a cached context runs as its own masked call.
 */
#include "amx_common.h"

#define ATTN_KEY_PAD 32  /* P V's chunks of 32 keys */
#include "attention_common.h"

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static void attn_thread_begin(void) {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
}

static void attn_thread_end(void) { _tile_release(); }

/* all 16 rows (the tiles' height) */
static void attn_scores(const uint16_t *qa, int64_t q_ld, int rows, const uint16_t *kp, int dc, int jn, float *sbuf,
                        int nkp) {
    (void)rows;
    for (int j = 0; j < jn; j++) {
        _tile_zero(0);
        for (int c = 0; c < dc; c++) {
            _tile_loadd(1, qa + 32 * c, q_ld * 2);
            _tile_loadd(2, kp + ((size_t)(j * dc + c)) * 512, 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, sbuf + 16 * j, nkp * 4);
    }
}

/* all 16 rows (the tiles' height), D in halves of up to 64 (4 C tiles) */
static void attn_pv(const uint16_t *pbuf, int nkp, const uint16_t *vp, int dn, int rows, float *obuf, int D) {
    (void)rows;
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
}
