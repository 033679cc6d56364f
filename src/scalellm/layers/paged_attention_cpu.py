"""Decode attention straight over the paged KV cache on CPU (numba), without copies.

The torch path gathers every decode's K/V through its slots into a padded
[Bd, Hkv, Lmax, D] copy and runs one masked SDPA over it: at 64 decodes that
copy is most of the attention's memory traffic. The kernel (`_numba_kernels`)
reads each key and value once, where it lies in the cache, for all query heads of
its KV group, in float32; caches may be float32 or bfloat16.

numba compiles the kernel once per (cache dtype, head size, group size) and installation
(cached on disk where it can write; seconds cold, well under a second from the cache):
`fused_cpu.warm_up_in_background` does that off the engine's critical path. `supports(cache)`
says whether the kernel is ready for a cache; callers take the torch path otherwise
(not compiled yet, no numba, or SCALELLM_NO_NUMBA=1). Knows nothing of requests or scheduling.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scalellm.layers.numpy_views import bits, const_bits

logger = logging.getLogger(__name__)

_make_kernel: Any = None  # _numba_kernels.make_decode_attention, once numba is imported
_kernels: dict[tuple[int, int, bool], Any] = {}  # (head_dim, group, 8-bit codes) -> its specialised kernel
_compiled: set[tuple[torch.dtype, int, int]] = set()  # (cache dtype, head_dim, group) warmed up
_set_num_threads: Any = None
_max_threads = 1
_import_failed = False
_lock = threading.Lock()


def available() -> bool:
    """True when numba imports (importing it the first time)."""
    return _load()


def _key(cache: torch.Tensor, num_heads: int) -> tuple[torch.dtype, int, int]:
    # cache: a layer's [N*S, Hkv, D] view
    return cache.dtype, cache.shape[-1], num_heads // cache.shape[-2]


def supports(cache: torch.Tensor, num_heads: int) -> bool:
    """Whether the fused kernel is compiled for this cache ([N*S, Hkv, D] view, CPU, float32,
    bfloat16 or int8 codes) and `num_heads` query heads (see `warm_up`). Until it is, callers take the
    torch path: a decode step never waits for numba's compiler (seconds on a fresh installation)."""
    return _key(cache, num_heads) in _compiled and cache.device.type == "cpu"


def warm_up(dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int,
            query_dtype: torch.dtype | None = None) -> bool:
    """Import numba and compile (or load from its disk cache) the kernel for a `dtype` cache
    (float32, bfloat16, or int8 codes read with `query_dtype` queries) and these head counts
    (per rank); from then on `supports` says yes for them. Returns whether the kernel is usable."""
    query_dtype = query_dtype or dtype
    if (dtype not in (torch.float32, torch.bfloat16, torch.int8) or query_dtype not in (torch.float32, torch.bfloat16)
            or not available() or num_heads % num_kv_heads):
        return False
    key = (dtype, head_dim, num_heads // num_kv_heads)
    if key not in _compiled:
        t0 = time.monotonic()
        # queries and output in the model's dtype, the cache in its own (the layout at run time)
        q = torch.zeros(1, num_heads, head_dim, dtype=query_dtype)
        cache = torch.zeros(1, num_kv_heads, head_dim, dtype=dtype)
        scales = torch.ones(1, num_kv_heads) if dtype == torch.int8 else None
        decode_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), 1.0,
                         scales, scales)
        _compiled.add(key)
        logger.debug("fused CPU decode attention %s ready in %.2fs", key, time.monotonic() - t0)
    return True


def _kernel_for(head_dim: int, group: int, codes: bool) -> Any:
    key = (head_dim, group, codes)
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                kernel = _kernels[key] = _make_kernel(head_dim, group, codes)
    return kernel


def _vector_features() -> str | None:
    """LLVM's target features for numba: the host's, with 512-bit vectors preferred where the
    CPU has AVX-512 (SCALELLM_NUMBA_ZMM=0 keeps LLVM's choice). LLVM tunes Intel's AVX-512
    cores to prefer 256-bit vectors, so every kernel loop vectorised to 8 lanes; with 16, at
    4,096 rows: SiLU-mul + quantise 1.93 -> 1.61 ms hot and 3.5 -> 2.5 cold, quantising RMSNorm
    0.77 -> 0.69, row quantisation 0.45 -> 0.34. Set into NUMBA_CPU_FEATURES (a value already
    there wins) before numba is imported; it also keys numba's on-disk cache."""
    if os.environ.get("NUMBA_CPU_FEATURES") or os.environ.get("SCALELLM_NUMBA_ZMM") == "0":
        return None
    try:
        import llvmlite.binding as ll

        host = ll.get_host_cpu_features()
    except (ImportError, RuntimeError):
        return None
    if not host.get("avx512f"):
        return None
    os.environ["NUMBA_CPU_FEATURES"] = features = host.flatten() + ",-prefer-256-bit"
    return features


def _load() -> bool:
    if _make_kernel is not None or _import_failed:
        return _make_kernel is not None
    with _lock:
        return _load_locked()


def _load_locked() -> bool:
    global _make_kernel, _import_failed, _set_num_threads, _max_threads
    if _make_kernel is not None or _import_failed:
        return _make_kernel is not None
    if os.environ.get("SCALELLM_NO_NUMBA"):
        _import_failed = True
        return False
    try:
        features = _vector_features()
        import numba

        if features and numba.config.CPU_FEATURES is None:  # numba was imported before: tell its config too
            numba.config.CPU_FEATURES = features
        from scalellm.layers import _numba_kernels
    except ImportError:
        _import_failed = True
        return False
    _set_num_threads = numba.set_num_threads
    _max_threads = int(numba.config.NUMBA_NUM_THREADS)
    _make_kernel = _numba_kernels.make_decode_attention
    return True


@dataclass(slots=True)
class DecodeIndex:
    """One step's decode slots and lengths as the kernels take them (int64, C-contiguous
    numpy views), made once per step and shared by every layer."""

    slots: np.ndarray  # [B, Lmax]
    lens: np.ndarray  # [B]


def prepare(slots: torch.Tensor, lens: torch.Tensor) -> DecodeIndex:
    """slots: [B, Lmax] (entries past a row's length are ignored); lens: [B]. Also sets this
    thread's numba thread count to torch's (a tensor-parallel rank runs with fewer)."""
    if not _load():
        raise RuntimeError("numba is not installed: the fused CPU decode attention is unavailable")
    _set_num_threads(max(1, min(torch.get_num_threads(), _max_threads)))  # numba's setting is per thread
    # NOTE: one layout for every call (C-contiguous, int64 indices): numba compiles once per
    # distinct argument type, and a strided view would cost another compilation.
    return DecodeIndex(slots.to(torch.int64).contiguous().numpy(), lens.to(torch.int64).contiguous().numpy())


NO_SCALES = np.ones((1, 1), dtype=np.float32)  # the scales argument of a kernel whose cache has none


def run_rows(q_rows: torch.Tensor, num_heads: int, k_flat: torch.Tensor, v_flat: torch.Tensor,
             index: DecodeIndex, scale: float, out: torch.Tensor,
             k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> None:
    """Decode attention written into `out` [B, H*D], queries read in place: q_rows is [B, W]
    (C-contiguous rows, e.g. a qkv projection's) whose first H*D columns are the B queries'
    heads. q_rows and out are float32 or bfloat16; k_flat, v_flat: a layer's [N*S, Hkv, D]
    caches (float32 or bfloat16; or int8 codes with k_scales, v_scales [N*S, Hkv] float32)."""
    rows = (k_flat.shape[0], k_flat.shape[-2] * k_flat.shape[-1])
    codes = k_scales is not None and v_scales is not None
    kernel = _kernel_for(k_flat.shape[-1], num_heads // k_flat.shape[-2], codes)
    kernel(bits(q_rows), num_heads, const_bits(k_flat, rows), const_bits(v_flat, rows),
           const_bits(k_scales) if codes else NO_SCALES, const_bits(v_scales) if codes else NO_SCALES,
           index.slots, index.lens, np.float32(scale), bits(out))


def run(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, index: DecodeIndex, scale: float,
        k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, D] (any float dtype); k_flat, v_flat: a layer's [N*S, Hkv, D] K and V caches
    (float32, bfloat16, or int8 codes with their scales) -> [B, H, D] in q's dtype."""
    b, h, d = q.shape
    if q.dtype not in (torch.float32, torch.bfloat16):
        return run(q.float(), k_flat, v_flat, index, scale, k_scales, v_scales).to(q.dtype)
    out = torch.empty(b, h * d, dtype=q.dtype)
    run_rows(q.reshape(b, h * d).contiguous(), h, k_flat, v_flat, index, scale, out, k_scales, v_scales)
    return out.view(b, h, d)


def decode_attention(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float, k_scales: torch.Tensor | None = None,
                     v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """One call: q: [B, H, D]; k_flat, v_flat: [N*S, Hkv, D] float32 or bfloat16 cache views
    (or int8 codes with k_scales, v_scales [N*S, Hkv]); slots: [B, Lmax]; lens: [B] -> [B, H,
    D] in q's dtype. (The model's layers call `prepare` once per step and `run` per layer.)"""
    return run(q, k_flat, v_flat, prepare(slots, lens), scale, k_scales, v_scales)
