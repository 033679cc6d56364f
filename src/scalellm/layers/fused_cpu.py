"""Fused CPU kernels (numba) for the per-layer glue around the linears: RMSNorm with its
residual add, SiLU-and-mul, and rotary + KV-cache write.

In torch each of these is a chain of small ops, and for bfloat16 activations most of
the chain is dtype conversions: measured at 64 decodes on SmolLM2 (30 layers), the glue
cost about as much as the linears themselves. Each kernel here makes one pass.

Like `paged_attention_cpu`, kernels compile in the background (`warm_up`); `supports`
says whether they are ready for a tensor's dtype, and callers keep the torch path until
then (or without numba, or with SCALELLM_NO_NUMBA=1). Knows nothing of models or
requests: tensors in, tensors out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from scalellm.layers import causal_attention_cpu, paged_attention_cpu
from scalellm.layers.numpy_views import bits as _bits
from scalellm.layers.numpy_views import const_bits, empty, scratch
from scalellm.memory import drop_library_pages, trim_heap

logger = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16)
_compiled: set[torch.dtype] = set()
_int8: Any = None  # _numba_int8, once imported
_warm_started: set[tuple[torch.dtype, int, int, int, bool]] = set()  # warm_up_in_background's
_warm_done: set[tuple[torch.dtype, bool]] = set()  # warm_up_model (dtype, 8-bit KV) finished, heap trimmed
_rope_kernels: dict[tuple[int, bool], Any] = {}  # (head_dim, 8-bit KV) -> its rotary + KV-write kernel
_rope_ready: set[tuple[torch.dtype, int, bool]] = set()  # (dtype, head_dim, 8-bit KV) compiled
_kernels: Any = None
_silu_table: np.ndarray | None = None  # bfloat16 SiLU, by the input's 16 bits (silu_and_mul_table)
_lock = threading.Lock()
_started_lock = threading.Lock()
_free = threading.Event()  # cleared inside compile_after()
_free.set()
_torch_only = 0  # > 0 inside torch_paths()


_NO_ROW_SCALES = np.ones(1, dtype=np.float32)  # rope_write_kv's row scales when there are none
_NO_VECTOR = np.empty(0, dtype=np.float32)  # a float32 vector argument that is not used (its flag is off)


def ready() -> bool:
    """Whether the kernels are compiled for some dtype: then the float32 ones (the draws,
    re-scoring the LM head's logits) are too, whatever the model's dtype."""
    return bool(_compiled)


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels are compiled for x's dtype (and x is on the CPU), outside `torch_paths`."""
    return supports_dtype(x.dtype) and x.device.type == "cpu"


def supports_dtype(dtype: torch.dtype) -> bool:
    """`supports` for CPU tensors of `dtype` (none at hand to ask with)."""
    return not _torch_only and dtype in _compiled


def torch_only() -> bool:
    """Inside `torch_paths`: every CPU kernel (here and elsewhere) keeps its torch path."""
    return _torch_only > 0


@contextlib.contextmanager
def torch_paths() -> Iterator[None]:
    """Within it, `supports` and `rope_ready` say no: a model runs its torch ops whether or
    not the kernels have finished compiling in the background. For passes whose result must
    not depend on that race (the int8 calibration, which runs while they compile)."""
    global _torch_only
    _torch_only += 1
    try:
        yield
    finally:
        _torch_only -= 1


def warm_up(dtype: torch.dtype) -> bool:
    """Compile (or load from numba's disk cache) every kernel for `dtype` activations."""
    global _kernels, _int8, _silu_table
    if dtype not in _DTYPES or not paged_attention_cpu.available():
        return False
    with _lock:
        if dtype in _compiled:
            return True
        t0 = time.monotonic()
        from scalellm.layers import _numba_fused, _numba_int8

        _kernels, _int8 = _numba_fused, _numba_int8
        if dtype == torch.bfloat16:
            table = np.empty(1 << 16, dtype=np.float32)
            _numba_fused.silu_table(table, np.zeros((1, 1), dtype=np.int16))
            _silu_table = table
        x = torch.ones(1, 8, dtype=dtype)
        w = torch.ones(8, dtype=dtype)
        for out32 in (False, True):  # inner norms, and the final norm (float32 out for the LM head)
            rms_norm(x, w, 1e-6, x, out_float32=out32)
            rms_norm(x, w, 1e-6, None, out_float32=out32)
        silu_and_mul(x)
        # (smoothing and bias are run-time flags over arrays of fixed types: one call compiles all)
        int8_rows(x, torch.ones(8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4), torch.ones(4, dtype=dtype))
        one = torch.ones(1)  # the int8-rows chain (layers/int8_rows.py)
        quant_rows(x, torch.ones(8))
        norm_quant(x, one, x, w, 1e-6, torch.ones(8))
        silu_mul_quant(x, x, one, torch.ones(8))
        scale_rows(x, one, w)
        inverse_cdf_draw(torch.ones(1, 4), torch.zeros(1, dtype=torch.float64))
        softmax_draw(torch.zeros(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.float64))
        rescore_near_max(torch.zeros(1, 4), torch.zeros(1, 8), torch.zeros(4, 8, dtype=dtype), 0.0, 0.0)
        if dtype == torch.bfloat16:  # a tied LM head's GEMM blocks (ParallelLMHead.share_with)
            rescore_near_max(torch.zeros(1, 4), torch.zeros(1, 8), torch.zeros(1, 4, 64, 2, dtype=dtype), 0.0, 0.0)
        _compiled.add(dtype)
        logger.debug("fused CPU kernels (%s) ready in %.2fs", dtype, time.monotonic() - t0)
    return True


def warm_up_model(dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int,
                  kv_codes: bool = False) -> bool:
    """Compile (or load from numba's disk cache) every CPU kernel a model with these
    attention heads (per rank) and `dtype` activations uses: the decode attention and the
    kernels here (for an 8-bit KV cache with `kv_codes`). Then hands the compiler's memory
    back. Returns whether any is usable."""
    try:
        if dtype == torch.bfloat16:
            causal_attention_cpu.load()  # a C compiler's subprocess, ~1 s, once per machine
        ok = paged_attention_cpu.warm_up(torch.int8 if kv_codes else dtype, head_dim, num_heads, num_kv_heads,
                                         query_dtype=dtype)
        fused = warm_up(dtype)
        if fused:
            warm_up_rope(dtype, head_dim, kv_codes)
        if fused or ok:
            trim_heap()  # compiling left this thread's malloc arena holding freed memory
            # LLVM's code pages (~65 MiB resident) serve compiling and loading kernels only;
            # calls to a loaded kernel do not touch them
            drop_library_pages("libllvmlite")
            return True
        return False
    finally:
        _warm_done.add((dtype, kv_codes))


def warmed_up(dtype: torch.dtype, kv_codes: bool = False) -> bool:
    """Whether `warm_up_model` for `dtype` (and an 8-bit KV cache or not) is over (whatever it
    found): from then on no compilation or heap trim runs beside the engine."""
    return (dtype, kv_codes) in _warm_done


def warm_up_in_background(dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int,
                          kv_codes: bool = False) -> None:
    """`warm_up_model` on a daemon thread (a fresh installation compiles for ~15 s; numba's
    disk cache makes later starts ~1 s). Until it is done the model runs its torch paths.
    Once per set of arguments: a second call starts nothing."""
    key = (dtype, head_dim, num_heads, num_kv_heads, kv_codes)
    with _started_lock:  # not _lock: a compilation holds that for seconds
        if key in _warm_started:
            return
        _warm_started.add(key)
    threading.Thread(target=_warm_up_when_free, args=key, name="numba-warm-up", daemon=True).start()


def _warm_up_when_free(*key: Any) -> None:
    # loading from numba's disk cache at once; compiling only after `compile_after`'s block
    if not _free.is_set() and not (paged_attention_cpu.available() and cached_on_disk()):
        _free.wait()
    warm_up_model(*key)


@contextlib.contextmanager
def compile_after() -> Iterator[None]:
    """Kernels started (`warm_up_in_background`) inside this block load from numba's disk
    cache right away, but compile only once it is over. For the model's load: loading the
    cached kernels beside it (~0.5 s) makes them ready with the model; compiling beside it
    (~15 s of GIL-bound work on a fresh installation) slowed a 1.2 s load to ~9 s."""
    _free.clear()
    try:
        yield
    finally:
        _free.set()


def cached_on_disk() -> bool:
    """Whether numba's disk cache seems to hold these kernels (one's index file exists): then
    they load in well under a second instead of compiling. False when unsure."""
    try:
        from scalellm.layers import _numba_fused

        return os.path.exists(_numba_fused.rms_norm._cache._cache_file._index_path)
    except (ImportError, AttributeError):  # numba's cache internals moved: assume a compilation
        return False


def rope_ready(dtype: torch.dtype, head_dim: int, kv_codes: bool = False) -> bool:
    """Whether `rope_write_kv` is compiled for this dtype and head size, writing K/V as they
    are or (kv_codes) as 8-bit codes (see `warm_up_rope`)."""
    return not _torch_only and (dtype, head_dim, kv_codes) in _rope_ready


def warm_up_rope(dtype: torch.dtype, head_dim: int, kv_codes: bool = False) -> bool:
    """Compile (or load from numba's disk cache) `rope_write_kv` for `dtype` and heads of
    `head_dim` (even), for a cache of `dtype` or of 8-bit codes; from then on `rope_ready`
    says yes for them."""
    if dtype not in _compiled or head_dim % 2:
        return False
    if (dtype, head_dim, kv_codes) not in _rope_ready:
        qkv = torch.ones(1, 3 * head_dim, dtype=dtype)
        cache = torch.zeros(1, 1, head_dim, dtype=torch.int8 if kv_codes else dtype)
        scales = torch.ones(1, 1) if kv_codes else None
        table = torch.ones(1, head_dim // 2)
        pos = torch.zeros(1, dtype=torch.long)
        rope_write_kv(qkv, 1, 1, head_dim, pos, table, table, pos, cache, cache, scales, scales, torch.ones(1))
        _rope_ready.add((dtype, head_dim, kv_codes))
    return True


def _rope_kernel(head_dim: int, kv_codes: bool) -> Any:
    key = (head_dim, kv_codes)
    kernel = _rope_kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _rope_kernels.get(key)
            if kernel is None:
                kernel = _rope_kernels[key] = _kernels.make_rope_write_kv(head_dim, kv_codes)
    return kernel


def int8_rows(x: torch.Tensor, inv_smooth: torch.Tensor | None, q_weight: torch.Tensor, w_scales: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 linear on torch._int_mm: x [M, K] (x's dtype, contiguous) -> [M, N] in x's dtype.
    Each row of x (times inv_smooth [K] float32, if given) is quantised to int8 with its own
    scale in one pass, multiplied by q_weight [N, K] int8 (per-channel scales w_scales [N]
    float32), and the int32 sums scaled back (+ bias [N]) in one more pass."""
    q, s = quant_rows(x, inv_smooth)
    acc = torch._int_mm(q, q_weight.t())
    out, out_np = empty((x.shape[0], q_weight.shape[0]), x.dtype)
    has_bias = bias is not None
    _int8.dequant_rows(acc.numpy(), s.numpy(), const_bits(w_scales),
                       const_bits(bias, (1, -1)) if bias is not None else out_np[:1], has_bias, out_np)
    return out


def dequant_cols(acc: torch.Tensor, w_scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An int8 GEMM's int32 sums acc [M, N] times the weight's channel scales w_scales [N]
    float32, in dtype (x's kernels' dtype), in one pass: float32(acc) * w_scale, rounded once."""
    global _ones
    out, out_np = empty(tuple(acc.shape), dtype)
    if _ones.shape[0] < acc.shape[0]:  # (row scales of 1: dequant_rows' row factor)
        _ones = np.ones(max(acc.shape[0], 2 * _ones.shape[0]), dtype=np.float32)
    _int8.dequant_rows(acc.numpy(), _ones[:acc.shape[0]], const_bits(w_scales), out_np[:1], False, out_np)
    return out


_ones = np.ones(64, dtype=np.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out_float32: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, E] contiguous, one dtype; weight: [E] in x's dtype. Returns
    weight * norm(x) (float32 if out_float32, else x's dtype), or with a residual
    (weight * norm(x + residual), x + residual) as RMSNorm's torch path does."""
    out, out_np = empty(tuple(x.shape), torch.float32 if out_float32 else x.dtype)
    x_np = _bits(x)
    has_res = residual is not None
    total, total_np = empty(tuple(x.shape), x.dtype) if has_res else (x, x_np)  # (x: not written)
    _kernels.rms_norm(x_np, _bits(residual) if has_res else x_np, has_res, const_bits(weight, (1, -1)),
                      np.float32(eps), not out_float32, out_np, total_np)
    return (out, total) if has_res else out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = [gate | up], contiguous -> silu(gate) * up: [T, I]."""
    out, out_np = empty((x.shape[0], x.shape[1] // 2), x.dtype)
    if x.dtype == torch.bfloat16:  # warm_up built the table before marking bfloat16 compiled
        _kernels.silu_and_mul_table(_bits(x), _silu_table, out_np)
    else:
        _kernels.silu_and_mul(_bits(x), out_np)
    return out


def rope_write_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor,
                  k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
                  row_scales: torch.Tensor | None = None) -> None:
    """In place: rotate the q and k heads of qkv [T, (H + 2 Hkv) D] (contiguous) by the
    rotary cos/sin tables [P, D/2] (float32) at each token's position (neox layout), then
    write each token's k and v to its slot of k_cache, v_cache ([N*S, Hkv, D], qkv's dtype;
    or int8 codes with their scales in k_scales, v_scales [N*S, Hkv] float32, as
    `kv_quant.quantize` makes them). positions and slot_mapping: [T] int64. Compiles the
    kernel on its first use (callers inside a step check `rope_ready` first). row_scales [T]
    float32: qkv is an int8 linear's output whose rows are first multiplied by these."""
    codes = k_scales is not None and v_scales is not None
    none = paged_attention_cpu.NO_SCALES
    rows = (k_cache.shape[0], -1)
    _rope_kernel(head_dim, codes)(
        _bits(qkv), num_heads, num_kv_heads, positions.numpy(), const_bits(cos), const_bits(sin), slot_mapping.numpy(),
        const_bits(k_cache, rows), const_bits(v_cache, rows),
        const_bits(k_scales) if codes else none, const_bits(v_scales) if codes else none,
        row_scales.numpy() if row_scales is not None else _NO_ROW_SCALES, row_scales is not None)


def inverse_cdf_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs: [B, V] float32 (non-negative, rows need not sum to 1); u: [B] float64 uniforms
    in [0, 1) -> [B] int64: per row the first index whose cumulative probability (float64)
    exceeds u * the row's total, never one of probability 0. The same as a float64 cumsum
    and searchsorted, without materialising the [B, V] float64 cumulative sums
    (measured at 64 x 49,152: 13.8 ms for that cumsum alone)."""
    out = torch.empty(probs.shape[0], dtype=torch.long)
    _kernels.inverse_cdf(probs.contiguous().numpy(), u.contiguous().numpy(), out.numpy())
    return out


def softmax_draw(logits: torch.Tensor, temperatures: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] float32; temperatures: [B] (> 0); u: [B] float64 uniforms in [0, 1)
    -> [B] int64: one draw per row from softmax(logits / temperature) by inverse CDF, in one
    numba pass per row (no [B, V] probabilities); -inf logits are never drawn."""
    out = torch.empty(logits.shape[0], dtype=torch.long)
    inv = (1.0 / temperatures.to(torch.float32)).contiguous()
    _kernels.sample_softmax(logits.contiguous().numpy(), inv.numpy(), u.contiguous().numpy(), out.numpy())
    return out


def rescore_near_max(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                     rel_margin: float, abs_margin: float) -> None:
    """In place: logits [B, V] (float32, contiguous) within rel_margin * |row max| + abs_margin
    of their row's maximum are recomputed exactly as hidden [B, E] (float32) . weight[v]
    ([V, E], float32 or bfloat16; or a bfloat16 GEMM's blocks [V/64, E/2, 64, 2], Bf16Blocks)."""
    _kernels.rescore_near_max(logits.numpy(), hidden.contiguous().numpy(), const_bits(weight),
                              np.float32(rel_margin), np.float32(abs_margin))


def _scratch(width: int) -> np.ndarray:
    # a float32 row per thread of numba's pool (numba.get_thread_id() < its size), for the
    # quantising kernels
    return scratch(_int8.numba.config.NUMBA_NUM_THREADS, width)


def quant_rows(x: torch.Tensor, inv_smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (contiguous; times inv_smooth [K] float32 if given) -> int8 codes [M, K] and one
    float32 scale a row [M] (max |row| / 127; codes rounded half up), in one pass."""
    m, k = x.shape
    q, q_np = empty((m, k), torch.int8)
    s, s_np = empty((m,), torch.float32)
    has_smooth = inv_smooth is not None
    _int8.quant_rows(_bits(x), const_bits(inv_smooth) if has_smooth else _NO_VECTOR, has_smooth, q_np, s_np,
                     _scratch(k))
    return q, s


def norm_quant(x: torch.Tensor, x_scales: torch.Tensor | None, residual: torch.Tensor | None, weight: torch.Tensor,
               eps: float, inv_smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm straight to int8 rows: v = x * x_scales[:, None] (x an int8 linear's row-scaled
    output; as is without x_scales) + residual, rounded to x's dtype; y = weight * norm(v)
    (* inv_smooth). Returns (codes [T, E] int8, scales [T] float32, v [T, E])."""
    t, e = x.shape
    codes, codes_np = empty((t, e), torch.int8)
    scales, scales_np = empty((t,), torch.float32)
    total, total_np = empty((t, e), x.dtype)
    x_np = _bits(x)
    _int8.norm_quant(x_np, x_scales.numpy() if x_scales is not None else _NO_VECTOR, x_scales is not None,
                     _bits(residual) if residual is not None else x_np, residual is not None,
                     const_bits(weight, (1, -1)), const_bits(inv_smooth) if inv_smooth is not None else _NO_VECTOR,
                     inv_smooth is not None, np.float32(eps), total_np, codes_np, scales_np, _scratch(e))
    return codes, scales, total


def silu_mul_quant(gate: torch.Tensor, up: torch.Tensor, row_scales: torch.Tensor,
                   inv_smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate * s) * (up * s) for row scales s [T] (the int8 GEMMs' outputs [T, I],
    contiguous), times inv_smooth [I] if given, as int8 rows: (codes [T, I], scales [T])."""
    t, i = gate.shape
    codes, codes_np = empty((t, i), torch.int8)
    scales, scales_np = empty((t,), torch.float32)
    has_smooth = inv_smooth is not None
    _int8.silu_mul_quant(_bits(gate), _bits(up), row_scales.numpy(),
                         const_bits(inv_smooth) if has_smooth else _NO_VECTOR, has_smooth, codes_np, scales_np,
                         _scratch(i))
    return codes, scales


def scale_rows(x: torch.Tensor, row_scales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, N] (contiguous) * row_scales[:, None] (+ bias [N]) in x's dtype."""
    out, out_np = empty(tuple(x.shape), x.dtype)
    x_np = _bits(x)
    has_bias = bias is not None
    _int8.scale_rows(x_np, row_scales.numpy(), const_bits(bias, (1, -1)) if has_bias else x_np[:1], has_bias, out_np)
    return out
