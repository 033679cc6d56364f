"""Decode attention straight over the paged KV cache on CPU (numba), without copies.

The torch path gathers every decode's K/V through its slots into a padded
[Bd, Hkv, Lmax, D] copy and runs one masked SDPA over it: at 64 decodes that
copy is most of the attention's memory traffic. The kernels (`_numba_kernels`)
read each key and value once, where it lies in the cache, for all query heads of
its KV group, in float32; caches may be float32 or bfloat16.

numba compiles each kernel once per installation (cached on disk where it can
write; ~4 s cold, ~0.8 s to load from the cache): `warm_up_in_background` does
that off the engine's critical path. `supports(cache)` says whether a cache can
use the fused path; callers fall back to the torch path otherwise (no numba, or
SCALELLM_NO_NUMBA=1). Knows nothing of requests or scheduling.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_kernels: dict[torch.dtype, Any] = {}  # cache dtype -> numba kernel, once numba is imported
_set_num_threads: Any = None
_max_threads = 1
_import_failed = False
_lock = threading.Lock()


def available() -> bool:
    """True when numba imports (importing it the first time)."""
    return _load()


def supports(cache: torch.Tensor) -> bool:
    """Whether the fused kernel can read this cache (CPU, float32 or bfloat16)."""
    return cache.device.type == "cpu" and cache.dtype in (torch.float32, torch.bfloat16) and _load()


def warm_up_in_background(dtype: torch.dtype = torch.float32) -> None:
    """Import numba and compile (or load from the disk cache) the kernel for a `dtype` cache
    on a daemon thread, so that the first decode step does not pay for it."""

    def run() -> None:
        t0 = time.monotonic()
        if not available() or dtype not in _kernels:
            return
        q = torch.zeros(1, 1, 4)  # [B=1, H=1, D=4]; the cache views have the same layout
        cache = torch.zeros(1, 1, 4, dtype=dtype)
        decode_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), 1.0)
        logger.debug("fused CPU decode attention (%s cache) ready in %.2fs", dtype, time.monotonic() - t0)

    threading.Thread(target=run, name="numba-warm-up", daemon=True).start()


def _load() -> bool:
    if _kernels or _import_failed:
        return bool(_kernels)
    with _lock:
        return _load_locked()


def _load_locked() -> bool:
    global _import_failed, _set_num_threads, _max_threads
    if _kernels or _import_failed:
        return bool(_kernels)
    if os.environ.get("SCALELLM_NO_NUMBA"):
        _import_failed = True
        return False
    try:
        import numba

        from scalellm.layers import _numba_kernels
    except ImportError:
        _import_failed = True
        return False
    _set_num_threads = numba.set_num_threads
    _max_threads = int(numba.config.NUMBA_NUM_THREADS)
    _kernels[torch.bfloat16] = _numba_kernels.decode_attention_bf16
    _kernels[torch.float32] = _numba_kernels.decode_attention_f32
    return True


def decode_attention(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, H, D] (any float dtype); k_flat, v_flat: [N*S, Hkv, D] float32 or bfloat16 cache
    views; slots: [B, Lmax] (entries past a row's length are ignored); lens: [B] -> [B, H, D]
    in q's dtype."""
    if not _load():
        raise RuntimeError("numba is not installed: the fused CPU decode attention is unavailable")
    kernel = _kernels.get(k_flat.dtype)
    if kernel is None:
        raise TypeError(f"no fused CPU decode attention for a {k_flat.dtype} cache")
    # NOTE: one layout for every call (C-contiguous, float32 q, int64 indices): numba compiles
    # once per distinct argument type, and a strided view would cost another compilation.
    q32 = q.to(torch.float32).contiguous()
    out = torch.empty_like(q32)
    slots = slots.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    if k_flat.dtype == torch.bfloat16:
        k_np, v_np = k_flat.view(torch.int16).numpy(), v_flat.view(torch.int16).numpy()
    else:
        k_np, v_np = k_flat.numpy(), v_flat.numpy()
    # the same thread count as torch's ops (a tensor-parallel rank runs with fewer); numba's
    # setting is per calling thread
    _set_num_threads(max(1, min(torch.get_num_threads(), _max_threads)))
    kernel(q32.numpy(), k_np, v_np, slots.numpy(), lens.numpy(), np.float32(scale), out.numpy())
    return out if q.dtype == torch.float32 else out.to(q.dtype)
