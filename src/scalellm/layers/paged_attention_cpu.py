"""Decode attention straight over the paged KV cache on CPU (numba), without copies.

The torch path gathers every decode's K/V through its slots into a padded
[Bd, Hkv, Lmax, D] copy and runs one masked SDPA over it: at 64 decodes that
copy is most of the attention's memory traffic. This kernel reads each key and
value once, where it lies in the cache, for all query heads of its KV group:

    for each (decode b, kv head h), in parallel:
        s[g, j] = scale * q[b, h*G+g] . K[slot[b, j], h]        j < len[b]
        p = softmax(s[g, :])
        out[b, h*G+g] = sum_j p[g, j] * V[slot[b, j], h]

in float32, with a two-pass softmax (scores first, then one pass over V).

numba compiles it once per process (cached on disk where it can write), so the
first decode step of a fresh installation pays ~1-2 s. `available()` says
whether numba is importable; callers fall back to the torch path otherwise.
Knows nothing of requests or scheduling.
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
_kernel: Any = None
_set_num_threads: Any = None
_import_failed = False
_lock = threading.Lock()


def available() -> bool:
    """True when numba imports (the kernel is compiled lazily, at first call)."""
    return _load() is not None


def warm_up_in_background() -> None:
    """Import numba and compile (or load from the disk cache) the kernel on a daemon thread,
    so that the first decode step does not pay for it."""

    def run() -> None:
        t0 = time.monotonic()
        if not available():
            return
        tiny = torch.zeros(1, 1, 4)  # [B=1, H=1, D=4]; the cache views have the same layout
        decode_attention(tiny, tiny, tiny, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), 1.0)
        logger.debug("fused CPU decode attention ready in %.2fs", time.monotonic() - t0)

    threading.Thread(target=run, name="numba-warm-up", daemon=True).start()


def _max_threads() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def _load() -> Any:
    if _kernel is not None or _import_failed:
        return _kernel
    with _lock:
        return _load_locked()


def _load_locked() -> Any:
    global _kernel, _import_failed, _set_num_threads
    if _kernel is not None or _import_failed:
        return _kernel
    if os.environ.get("SCALELLM_NO_NUMBA"):
        _import_failed = True
        return None
    try:
        import numba
    except ImportError:
        _import_failed = True
        return None

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def decode_attention(q, k_cache, v_cache, slots, lens, scale, out):  # pragma: no cover - numba
        # q, out: [B, H, D]; k_cache, v_cache: [N*S, Hkv, D]; slots: [B, Lmax]; lens: [B]
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[1]
        group = num_heads // num_kv_heads
        for item in numba.prange(num_seqs * num_kv_heads):
            b = item // num_kv_heads
            h = item - b * num_kv_heads
            length = lens[b]
            scores = np.empty((group, length), dtype=np.float32)
            # pass 1: scores and their row maxima
            for g in range(group):
                qh = q[b, h * group + g]
                best = np.float32(-np.inf)
                for j in range(length):
                    kv = k_cache[slots[b, j], h]
                    acc = np.float32(0.0)
                    for d in range(head_dim):
                        acc += qh[d] * kv[d]
                    acc *= scale
                    scores[g, j] = acc
                    if acc > best:
                        best = acc
                total = np.float32(0.0)
                for j in range(length):
                    e = np.exp(scores[g, j] - best)
                    scores[g, j] = e
                    total += e
                inv = np.float32(1.0) / total
                for j in range(length):
                    scores[g, j] *= inv
            # pass 2: one read of V for the whole group
            acc = np.zeros((group, head_dim), dtype=np.float32)
            for j in range(length):
                vv = v_cache[slots[b, j], h]
                for g in range(group):
                    p = scores[g, j]
                    for d in range(head_dim):
                        acc[g, d] += p * vv[d]
            for g in range(group):
                for d in range(head_dim):
                    out[b, h * group + g, d] = acc[g, d]

    _set_num_threads = numba.set_num_threads
    _kernel = decode_attention
    return _kernel


def decode_attention(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, H, D] float32; k_flat, v_flat: [N*S, Hkv, D] float32 cache views; slots: [B, Lmax]
    int64 (entries past a row's length are ignored); lens: [B] int64 -> [B, H, D]."""
    kernel = _load()
    if kernel is None:
        raise RuntimeError("numba is not installed: the fused CPU decode attention is unavailable")
    # NOTE: one layout for every call (C-contiguous, int64 indices): numba compiles once per
    # distinct argument type, and a strided slots view would cost a second compilation.
    q = q.contiguous()
    out = torch.empty_like(q)
    slots = slots.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    # the same thread count as torch's ops (a tensor-parallel rank runs with fewer); numba's
    # setting is per calling thread
    _set_num_threads(max(1, min(torch.get_num_threads(), _max_threads())))
    kernel(q.numpy(), k_flat.numpy(), v_flat.numpy(), slots.numpy(), lens.numpy(), np.float32(scale), out.numpy())
    return out
