"""Causal attention of prefill chunks on Intel AMX: a small C kernel, compiled at run time.

torch's CPU flash-attention kernel cuts prompts shorter than 192 tokens into 32-row query
blocks: for a 4,096-token prefill step of 128-token prompts at SmolLM2's heads that is ~2,300
small GEMMs a layer, ~20% of the step; and a chunk that continues a cached context (a prefix
cache hit, a long prompt's later chunks) gathers its keys and runs its own masked call.
`csrc/causal_attention_amx.c` does all of a layer's chunks in one call on AMX tiles (16-row
blocks, float32 scores and softmax, bf16 P and output as torch's kernel has them), reading
cached keys where they lie: 1.5-1.7 ms a layer against 3.3-4.2 at 32 x 128 fresh tokens.

The C file is compiled once per machine with the system's C compiler (`$CC`, else gcc,
else cc; ~1 s) into the cache directory ($SCALELLM_CACHE_DIR, else $XDG_CACHE_HOME/scalellm,
else ~/.cache/scalellm), keyed by the source and the flags, and loaded with ctypes. Without
a compiler, AMX (Linux x86-64, `amx_bf16` in /proc/cpuinfo and the kernel's permission for
the tile state) or with SCALELLM_NO_AMX_ATTENTION=1, `ready()` stays False and callers keep
torch's SDPA. Knows nothing of models or requests: row offsets and lengths in, rows out.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from itertools import accumulate

import torch

from scalellm.paths import cache_dir

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "causal_attention_amx.c")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
          "-fopenmp", "-shared", "-fPIC"]
_CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512bw", "avx512vl")
MAX_HEAD_DIM = 128  # the kernel's per-thread scratch holds 16 rows of at most 128

_lock = threading.Lock()
_fn = None  # the loaded sl_causal_attention, once ready
_tried = False  # load() ran (whatever it found)


def ready() -> bool:
    """Whether the kernel is loaded (see the module docstring)."""
    return _fn is not None


def supports(q: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `run` takes these queries: the kernel is loaded, bf16 on the CPU, heads of a
    multiple of 32 up to MAX_HEAD_DIM, whole query groups per KV head."""
    return (_fn is not None and q.dtype == torch.bfloat16 and q.device.type == "cpu"
            and head_dim % 32 == 0 and head_dim <= MAX_HEAD_DIM and num_heads % num_kv_heads == 0)


def _cpu_has_amx() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return all(flag in flags for flag in _CPU_FLAGS)
    except OSError:
        pass
    return False


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _build(compiler: str) -> str | None:
    """The shared library's path, compiling it into the cache directory unless it is there."""
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join([os.path.basename(compiler)] + _FLAGS).encode()).hexdigest()[:16]
    directory = cache_dir()
    path = os.path.join(directory, f"causal_attention_amx-{key}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        res = subprocess.run([compiler, *_FLAGS, _SOURCE, "-o", tmp], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            logger.info("AMX prefill attention not built (%s): %s", compiler, res.stderr.strip()[-500:])
            return None
        os.replace(tmp, path)  # atomic: a concurrent server loads one whole file or the other
        return path
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> bool:
    """Build (once per machine) and load the kernel where the CPU and a compiler allow;
    returns `ready()`. Safe to call from any thread, any number of times."""
    global _fn, _tried
    if _tried:
        return _fn is not None
    with _lock:
        if _tried:
            return _fn is not None
        _tried = True
        if os.environ.get("SCALELLM_NO_AMX_ATTENTION") or not _cpu_has_amx():
            return False
        compiler = _compiler()
        if compiler is None:
            logger.info("AMX prefill attention off: no C compiler ($CC, gcc, cc)")
            return False
        t0 = time.monotonic()
        try:
            path = _build(compiler)
            if path is None:
                return False
            lib = ctypes.CDLL(path)
        except (OSError, subprocess.SubprocessError) as e:
            logger.info("AMX prefill attention off: %s", e)
            return False
        if lib.sl_amx_init() != 0:  # the kernel refused this process the AMX tile state
            logger.info("AMX prefill attention off: arch_prctl(ARCH_REQ_XCOMP_PERM) failed")
            return False
        fn = lib.sl_causal_attention
        fn.restype = ctypes.c_int
        fn.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int] + [ctypes.c_void_p] * 5
                       + [ctypes.c_int] * 3 + [ctypes.c_float, ctypes.c_int, ctypes.c_int])
        _fn = fn
        logger.debug("AMX prefill attention ready in %.2fs (%s)", time.monotonic() - t0, path)
        return True


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
