"""Causal attention of prefill chunks on the CPU: a small C kernel, compiled at run time, on
Intel AMX or else on AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake).

torch's CPU flash-attention kernel cuts prompts shorter than 192 tokens into 32-row query
blocks: for a 4,096-token prefill step of 128-token prompts at SmolLM2's heads that is ~2,300
small GEMMs a layer; and a chunk that continues a cached context (a prefix cache hit, a long
prompt's later chunks) gathers its keys and runs its own masked call. The kernel does all of a
layer's chunks in one call (16-row query blocks, float32 scores and softmax, bf16 P and output
as torch's kernel has them), reading cached keys where they lie. `csrc/attention_common.h`
holds what the two builds share; the products run on AMX tiles (`causal_attention_amx.c`:
1.5-1.7 ms a layer against torch's 3.3-4.2 at 32 x 128 fresh tokens on a 2-core Xeon) or on
VDPBF16PS (`causal_attention_avx512.c`: see its header for the numbers on a 2-core Zen 4).

The C file is compiled once per machine and loaded with ctypes (`layers/native.py`). Without
a compiler, without AMX and AVX-512 BF16 (Linux x86-64, /proc/cpuinfo; AMX also needs the
kernel's permission for the tile state), or with SCALELLM_NO_CPU_ATTENTION=1, `ready()` stays
False and callers keep torch's SDPA. SCALELLM_NO_AMX_ATTENTION=1 skips only the AMX build.
Knows nothing of models or requests: row offsets and lengths in, rows out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from scalellm.layers import native

logger = logging.getLogger(__name__)

MAX_HEAD_DIM = 128  # the kernel's per-thread scratch holds 16 rows of at most 128

_lock = threading.Lock()
_fn = None  # the loaded sl_causal_attention, once ready
_backend = ""  # "amx" or "avx512", once ready
_tried = False  # load() ran (whatever it found)


def ready() -> bool:
    """Whether the kernel is loaded (see the module docstring)."""
    return _fn is not None


def backend() -> str:
    """Which build is loaded: "amx", "avx512", or "" (none: torch's SDPA)."""
    return _backend if _fn is not None else ""


def supports(q: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `run` takes these queries: the kernel is loaded, bf16 on the CPU, heads of a
    multiple of 32 up to MAX_HEAD_DIM, whole query groups per KV head."""
    return (_fn is not None and q.dtype == torch.bfloat16 and q.device.type == "cpu"
            and head_dim % 32 == 0 and head_dim <= MAX_HEAD_DIM and num_heads % num_kv_heads == 0)


BUILDS = ("amx", "avx512")  # in the order load() tries them


def open_build(name: str) -> Any:
    """The sl_causal_attention of one build ("amx" or "avx512"), built (once per machine) and
    loaded where the CPU and a compiler allow; None otherwise. (load() picks the first.)"""
    if name == "amx":
        lib = native.load_amx_library("causal_attention_amx.c", "AMX prefill attention")
    else:
        lib = native.load_vnni_library("causal_attention_avx512.c", "AVX-512 prefill attention", bf16=True)
    if lib is None:
        return None
    fn = lib.sl_causal_attention
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int] + [ctypes.c_void_p] * 5
                   + [ctypes.c_int] * 3 + [ctypes.c_float, ctypes.c_int, ctypes.c_int])
    return fn


def load() -> bool:
    """Build (once per machine) and load the kernel where the CPU and a compiler allow;
    returns `ready()`. Safe to call from any thread, any number of times."""
    global _fn, _backend, _tried
    with _lock:
        if not _tried:
            _tried = True
            _fn, _backend = _first_build()
    return _fn is not None


def _first_build() -> tuple[Any, str]:
    """The first of BUILDS that loads here and is not switched off, and its name; (None, "")."""
    if os.environ.get("SCALELLM_NO_CPU_ATTENTION"):
        return None, ""
    t0 = time.monotonic()
    for name in BUILDS:
        if name == "amx" and os.environ.get("SCALELLM_NO_AMX_ATTENTION"):
            continue
        fn = open_build(name)
        if fn is not None:
            logger.debug("prefill attention (%s) ready in %.2fs", name, time.monotonic() - t0)
            return fn, name
    return None, ""


@dataclass(frozen=True, slots=True)
class Chunks:
    """A step's prefill chunks as the kernel reads them (made by `chunks`)."""

    q_starts: torch.Tensor  # [n] int64: each chunk's first query row
    q_lens: torch.Tensor  # [n] int64: its query rows, the last positions of its context
    ctx_lens: torch.Tensor  # [n] int64: its keys (cached + this chunk's)
    kv_offs: torch.Tensor  # [n] int64: where its keys start in kv_index (or in k/v's rows)
    kv_index: torch.Tensor | None  # [sum ctx] int64 rows of k/v, or None: chunk s's key n is row kv_offs[s] + n
    max_ctx: int


def chunks(q_starts: list[int], q_lens: list[int], kv_rows: list[torch.Tensor] | None = None) -> Chunks:
    """Chunks with these query rows. `kv_rows`: each chunk's keys, as rows of the k/v that `run`
    gets (e.g. KV-cache slots: a chunk continuing a cached context has more keys than
    queries); None for fresh prompts whose keys are their own rows of the step's k/v."""
    if kv_rows is None:
        ctx = list(q_lens)
        offs, index = list(q_starts), None
    else:
        ctx = [int(r.numel()) for r in kv_rows]
        offs = list(accumulate(ctx, initial=0))[:-1]
        index = torch.cat([r.reshape(-1) for r in kv_rows]).to(torch.int64).contiguous()
    if any(c < n for c, n in zip(ctx, q_lens)):
        raise ValueError("a chunk has fewer keys than queries")
    table = torch.tensor([q_starts, q_lens, ctx, offs], dtype=torch.int64)  # one tensor, a contiguous row each
    return Chunks(table[0], table[1], table[2], table[3], index, max(ctx))


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, todo: Chunks, scale: float) -> bool:
    """Causal attention of each chunk's queries over its keys, into `out` [T, H*D] (rows of
    no chunk untouched).

    q: [T, H, D]; k, v: [rows, Hkv, D] (the step's own rows, or a KV cache's flat slots, as
    `todo` was made for), bf16 with unit stride inside a row and heads D apart (views into a
    QKV projection's rows are fine). Returns False (out incomplete) when the layout is not one
    the kernel reads or it could not allocate; the caller then takes its torch path."""
    fn = _fn
    if fn is None:
        return False
    _, h, d = q.shape
    hkv = k.shape[1]
    for x in (q, k, v):
        if x.stride(2) != 1 or x.stride(1) != d or x.dtype != torch.bfloat16:
            return False
    if out.stride(1) != 1 or out.dtype != torch.bfloat16 or out.shape[1] != h * d:
        return False
    index = todo.kv_index.data_ptr() if todo.kv_index is not None else None
    rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), q.stride(0), k.stride(0), v.stride(0),
            out.stride(0), todo.q_starts.numel(), todo.q_starts.data_ptr(), todo.q_lens.data_ptr(),
            todo.ctx_lens.data_ptr(), index, todo.kv_offs.data_ptr(), h, hkv, d, scale, todo.max_ctx,
            torch.get_num_threads())
    return rc == 0
