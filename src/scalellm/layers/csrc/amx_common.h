/*
 * What the AMX kernels of this directory share: the tile configuration's layout, the
 * process's permission for the tile state (and, from avx512_common.h, an exponential and bf16
 * rounding). (layers/native.py keys each build by its source and the headers beside it.)
 */
#ifndef SCALELLM_AMX_COMMON_H
#define SCALELLM_AMX_COMMON_H

#include "avx512_common.h"

#include <immintrin.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/syscall.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

/* Asks Linux for the AMX tile state (once per process; 0 on success). */
int sl_amx_init(void) {
    return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

#endif
