/* What the few-row GEMVs (bf16_gemv.c, vnni_gemv.c) share: a scalar rounding to bf16 and each
 * OpenMP thread's contiguous range of output channels. */
#ifndef SL_GEMV_COMMON_H
#define SL_GEMV_COMMON_H

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

#endif
