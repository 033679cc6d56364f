"""Decode attention straight over the paged KV cache on CPU (numba), without copies.

The torch path gathers every decode's K/V through its slots into a padded
[Bd, Hkv, Lmax, D] copy and runs one masked SDPA over it: at 64 decodes that
copy is most of the attention's memory traffic. The kernel (`_numba_kernels`)
reads each key and value once, where it lies in the cache, for all query heads of
its KV group, in float32; caches may be float32 or bfloat16.

numba compiles the kernel once per cache dtype and installation (cached on disk
where it can write; ~4 s cold, ~0.8 s to load from the cache):
`warm_up_in_background` does that off the engine's critical path. `supports(cache)`
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

from scalellm.memory import drop_library_pages, trim_heap

logger = logging.getLogger(__name__)

_kernel: Any = None  # the numba kernel, once numba is imported
_compiled: set[torch.dtype] = set()  # cache dtypes the kernel is compiled for (warm_up)
_set_num_threads: Any = None
_max_threads = 1
_import_failed = False
_lock = threading.Lock()


def available() -> bool:
    """True when numba imports (importing it the first time)."""
    return _load()


def supports(cache: torch.Tensor) -> bool:
    """Whether the fused kernel is compiled for this cache (CPU, float32 or bfloat16; see
    `warm_up`). Until it is, callers take the torch path: a decode step never waits for
    numba's compiler (~4 s on a fresh installation)."""
    return cache.dtype in _compiled and cache.device.type == "cpu"


def warm_up(dtype: torch.dtype) -> bool:
    """Import numba and compile (or load from its disk cache) the kernel for a `dtype` cache;
    from then on `supports` says yes for it. Returns whether the kernel is usable."""
    if dtype not in (torch.float32, torch.bfloat16) or not available():
        return False
    if dtype not in _compiled:
        t0 = time.monotonic()
        q = torch.zeros(1, 1, 4)  # [B=1, H=1, D=4]; the cache views have the same layout
        cache = torch.zeros(1, 1, 4, dtype=dtype)
        decode_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), 1.0)
        _compiled.add(dtype)
        logger.debug("fused CPU decode attention (%s cache) ready in %.2fs", dtype, time.monotonic() - t0)
    return True


def warm_up_in_background(dtype: torch.dtype = torch.float32) -> None:
    """`warm_up` on a daemon thread, then hand the compiler's freed memory back."""

    def warm() -> None:
        if warm_up(dtype):
            trim_heap()  # compiling left this thread's malloc arena holding freed memory
            # LLVM's code pages (~65 MiB resident) serve compiling and loading kernels only;
            # calls to a loaded kernel do not touch them
            drop_library_pages("libllvmlite")

    threading.Thread(target=warm, name="numba-warm-up", daemon=True).start()


def _load() -> bool:
    if _kernel is not None or _import_failed:
        return _kernel is not None
    with _lock:
        return _load_locked()


def _load_locked() -> bool:
    global _kernel, _import_failed, _set_num_threads, _max_threads
    if _kernel is not None or _import_failed:
        return _kernel is not None
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
    _kernel = _numba_kernels.decode_attention
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


def run(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, index: DecodeIndex, scale: float) -> torch.Tensor:
    """q: [B, H, D] (any float dtype); k_flat, v_flat: a layer's [N*S, Hkv, D] K and V caches
    (float32 or bfloat16) -> [B, H, D] in q's dtype."""
    if k_flat.dtype == torch.bfloat16:  # numba has no bfloat16: the kernel widens the raw bits
        k_flat, v_flat = k_flat.view(torch.int16), v_flat.view(torch.int16)
    q32 = q.to(torch.float32).contiguous()
    out = torch.empty_like(q32)
    _kernel(q32.numpy(), k_flat.numpy(), v_flat.numpy(), index.slots, index.lens, np.float32(scale), out.numpy())
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def decode_attention(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One call: q: [B, H, D]; k_flat, v_flat: [N*S, Hkv, D] float32 or bfloat16 cache views;
    slots: [B, Lmax]; lens: [B] -> [B, H, D] in q's dtype. (The model's layers call
    `prepare` once per step and `run` per layer.)"""
    return run(q, k_flat, v_flat, prepare(slots, lens), scale)
