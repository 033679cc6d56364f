"""Builds a ModelRunner: picks dtype and device, builds the model (for this process's
tensor-parallel rank, from the parallel state), loads weights, sizes the KV cache from
its memory budget (per rank: a rank holds only its KV heads)."""

from __future__ import annotations

import logging
import os
import time

import torch

from scalellm.layers import fused_cpu, kv_quant
from scalellm.layers.linear import INT4_MAX_ROWS, INT8_MAX_ROWS, onednn_packing_available
from scalellm.loader.model_source import ModelSource
from scalellm.models.args import ModelArgs
from scalellm.models.registry import get_model_class
from scalellm.protocol.errors import InvalidParameterError, KVCacheTooSmallError
from scalellm.worker.model_runner import ModelRunner, start_cpu_kernels

logger = logging.getLogger(__name__)

CALIBRATION_TOKENS = 512  # random tokens of the int8 calibration pass

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        chosen, why = _auto_dtype(device)
        logger.warning("dtype=auto: using %s on %s (%s)", chosen, device.type, why)
        return chosen
    if dtype not in _DTYPES:
        raise InvalidParameterError("dtype", f"must be one of auto, {', '.join(sorted(_DTYPES))}; got {dtype!r}")
    if _DTYPES[dtype] == torch.float16 and device.type == "cpu":
        raise InvalidParameterError("dtype", "float16 is not supported on CPU; use bfloat16 or float32")
    return _DTYPES[dtype]


def _pack_weights() -> bool:
    """Prepack bf16 weights for oneDNN (LinearBase.set_packed) unless SCALELLM_NO_PACKED_WEIGHTS=1."""
    return not os.environ.get("SCALELLM_NO_PACKED_WEIGHTS") and onednn_packing_available()


def cpu_has_fast_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    if device.type == "cuda":
        return torch.bfloat16, "GPU"
    # NOTE: measured on a 2-core AVX2-only EPYC: bf16 linear 19 GFLOP/s vs fp32 160 (bf16 is
    # emulated without AVX512-BF16/AMX). With those units bf16 is several times faster than fp32.
    if cpu_has_fast_bf16():
        return torch.bfloat16, "CPU has AVX512-BF16/AMX"
    return torch.float32, "CPU lacks AVX512-BF16/AMX, where bf16 is emulated and ~8x slower"


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads one rank holds: a share of them, or one (replicated) when fewer than ranks."""
    return max(1, num_kv_heads // tp_size)


def kv_block_bytes(args: ModelArgs, dtype: torch.dtype, block_size: int, tp_size: int = 1,
                   kv_cache_dtype: str = "auto") -> int:
    """Bytes of one KV block (K and V of every layer) on one rank; kv_cache_dtype "int8": a
    row of D values takes D bytes + its float32 scale (kv_quant)."""
    heads = kv_heads_per_rank(args.num_kv_heads, tp_size)
    row_bytes = args.head_dim + kv_quant.SCALE_BYTES if kv_cache_dtype == "int8" else \
        args.head_dim * torch.finfo(dtype).bits // 8
    return 2 * args.num_layers * heads * row_bytes * block_size


def num_kv_blocks(args: ModelArgs, dtype: torch.dtype, block_size: int, kv_cache_memory: int,
                  max_model_len: int, tp_size: int = 1, kv_cache_dtype: str = "auto") -> int:
    """Blocks that fit `kv_cache_memory` bytes of one rank (every rank gets the same count)."""
    bytes_per_block = kv_block_bytes(args, dtype, block_size, tp_size, kv_cache_dtype)
    num_blocks = kv_cache_memory // bytes_per_block
    needed = -(-max_model_len // block_size)
    if num_blocks < needed:
        raise KVCacheTooSmallError(
            f"kv_cache_memory={kv_cache_memory} bytes holds {num_blocks} blocks of {block_size} tokens "
            f"({bytes_per_block} bytes each), but one request of max_model_len={max_model_len} needs {needed} "
            f"blocks ({needed * bytes_per_block} bytes): raise kv_cache_memory or lower max_model_len"
        )
    return int(num_blocks)


def build_model_runner(
    source: ModelSource,
    args: ModelArgs,
    *,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    num_blocks: int,
    seed: int,
    is_driver: bool = True,
    quantization: str | None = None,
    cuda_graph_max_batch: int = 0,
    max_model_len: int | None = None,
    kv_cache_dtype: str = "auto",
) -> ModelRunner:
    """cuda_graph_max_batch: on GPU, capture decode CUDA graphs up to this batch size (0: none)."""
    t0 = time.perf_counter()
    model_cls = get_model_class(args.architecture)
    with torch.device(device):
        model = model_cls(args, dtype)
    with fused_cpu.compile_after():  # cached CPU kernels load while the weights do (a compilation waits)
        start_cpu_kernels(model, args, dtype, device, kv_cache_dtype)
        _load_and_quantize(model, args, source, dtype, device, quantization)
    _release_load_memory()
    logger.info("loaded %s (%s) in %.1fs", source.name, args.architecture, time.perf_counter() - t0)
    return ModelRunner(
        model, args, block_size=block_size, num_blocks=num_blocks, dtype=dtype, device=device,
        seed=seed, is_driver=is_driver,
        cuda_graph_max_batch=cuda_graph_max_batch if device.type == "cuda" else 0, max_model_len=max_model_len,
        kv_cache_dtype=kv_cache_dtype,
    )


def _load_and_quantize(model: torch.nn.Module, args: ModelArgs, source: ModelSource, dtype: torch.dtype,
                       device: torch.device, quantization: str | None) -> None:
    if quantization == "int4":  # before the load: it depends on nothing the weights bring
        _check_int4(dtype, device)
    model.load_weights(source.iter_weights())
    model.eval()
    if quantization == "int8":
        if device.type != "cpu":
            raise InvalidParameterError("quantization", "int8 (fbgemm W8A8) runs on CPU only")
        from scalellm.distributed.parallel_state import get_parallel_state
        from scalellm.quant.int8 import int8_rows_available, int_mm_fast, quantize_int8

        stats = _int8_calibration(model, args, source, dtype, device)
        # an int8 GEMM for every call (AMX kernel, oneDNN's int8 linear, our VNNI GEMM or
        # torch._int_mm: linear.int8_rows_backend), the quantisation and row scales fused into the kernels
        # around it (layers/int8_rows.py); else, with int8 units (torch._int_mm) and bf16 ones,
        # large calls (prefill) stay bf16 (layers/linear.py INT8_MAX_ROWS): both weights are kept
        packed_bf16 = dtype == torch.bfloat16 and cpu_has_fast_bf16() and _pack_weights()
        rows = (packed_bf16 and int8_rows_available() and get_parallel_state().tp_size == 1
                and hasattr(model, "link_int8_rows"))
        hybrid = packed_bf16 and not rows and int_mm_fast()
        saved = quantize_int8(model, stats, keep_weight=hybrid, onednn=rows)
        if rows:
            links = model.link_int8_rows()
            # what stays bf16 (the LM head) is prepacked, as in a bf16 model
            saved -= sum(m.set_packed() for m in model.modules()
                         if hasattr(m, "set_packed") and getattr(m, "qweight", None) is None)
            saved += _share_tied_embedding(model)
            from scalellm.layers.linear import int8_rows_backend

            backend = int8_rows_backend()
            gemm = type(backend).__name__ if backend is not None else "oneDNN's int8 GEMM"
            logger.info("int8 linears on %s, %d int8-rows links: %.0f MB of weights freed", gemm, links,
                        saved / 2**20)
        elif hybrid:
            saved -= sum(m.set_packed() for m in model.modules() if getattr(m, "qweight", None) is not None)
            logger.info("int8 linears on torch._int_mm for calls up to %d rows, bf16 (prepacked) above: +%.0f MB",
                        INT8_MAX_ROWS, -saved / 2**20)
        else:
            logger.info("int8 linears: %.0f MB of weights freed", saved / 2**20)
    elif quantization == "fp8":
        from scalellm.quant.fp8 import fp8_available

        if not fp8_available(device):
            raise InvalidParameterError("quantization", "fp8 needs torch._scaled_mm with float8 support and, on GPU, "
                                        "compute capability 8.9 or newer (Ada, Hopper)")
        if device.type == "cpu":
            logger.warning("fp8 on CPU: for checking its numerics; torch's CPU fp8 GEMM is slower than bf16")
        from scalellm.quant.fp8 import smooth_into_norm

        pairs = getattr(model, "norm_fed_linears", lambda: [])()
        if pairs:  # smoothing (quant/fp8.py): folded into the norms, free at serving time
            stats = _int8_calibration(model, args, source, dtype, device)
            for name, norm, linear in pairs:
                if name in stats:
                    smooth_into_norm(norm.weight, linear.weight, stats[name])
        saved = sum(m.set_fp8() for m in model.modules() if hasattr(m, "set_fp8"))
        logger.info("fp8 linears: %.0f MB of weights freed", saved / 2**20)
    elif dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        added = sum(m.set_fp32_compute() for m in model.modules() if hasattr(m, "set_fp32_compute"))
        logger.info("bf16 on a CPU without bf16 units: GEMMs in float32 on the bf16 values "
                    "(bf16 numerics with fp32 accumulation; +%.0f MB)", added / 2**20)
    elif dtype == torch.bfloat16 and device.type == "cpu" and _pack_weights():
        if quantization == "int4":
            _add_int4_copies(model)
        added = sum(m.set_packed() for m in model.modules() if hasattr(m, "set_packed"))
        added -= _share_tied_embedding(model)
        logger.info("bf16 linears prepacked (%+.0f MB: layouts' padding, and an LM head's copy beside "
                    "a tied embedding unless it shares our GEMM's blocks)", added / 2**20)


def _share_tied_embedding(model: torch.nn.Module) -> int:
    """A tied embedding reads the LM head's prepacked blocks, its own table freed (models
    with `share_tied_embedding`); returns the bytes freed."""
    share = getattr(model, "share_tied_embedding", None)
    return share() if share is not None else 0


def _check_int4(dtype: torch.dtype, device: torch.device) -> None:
    """quantization="int4" runs where bf16 weights are prepacked (the branch of
    `_load_and_quantize` that adds the copies) and torch has the CPU int4 GEMM."""
    from scalellm.quant.int4 import int4_cpu_available

    if not (dtype == torch.bfloat16 and device.type == "cpu" and cpu_has_fast_bf16() and _pack_weights()):
        raise InvalidParameterError("quantization", "int4 (4-bit weights for decode steps of up to "
                                    f"{INT4_MAX_ROWS} rows) runs on CPUs with bf16 units, with dtype bfloat16")
    if not int4_cpu_available():
        raise InvalidParameterError("quantization", "int4: this torch build has no CPU int4 GEMM "
                                    "(torch._weight_int4pack_mm_for_cpu)")


def _add_int4_copies(model: torch.nn.Module) -> None:
    """quantization="int4": a 4-bit copy of each bf16 linear (quant/int4.py) for the calls of up
    to INT4_MAX_ROWS rows; larger calls keep the bf16 weight (prepacked after this)."""
    linears = [m for m in model.modules() if hasattr(m, "set_int4")]
    added = sum(m.set_int4() for m in linears)
    logger.info("int4 copies of %d of %d linears for calls of up to %d rows: +%.0f MB",
                sum(1 for m in linears if m.int4 is not None), len(linears), INT4_MAX_ROWS, added / 2**20)


def _release_load_memory() -> None:
    """Hand back what loading used and the model does not keep: the GGUF memory maps
    (every weight page was read once) and the freed dequantization buffers, which glibc
    keeps in its heap until told to trim."""
    from scalellm.loader.gguf_loader import release_readers
    from scalellm.memory import trim_heap

    release_readers()
    trim_heap()


@torch.inference_mode()
def _int8_calibration(model: torch.nn.Module, args: ModelArgs, source: ModelSource, dtype: torch.dtype,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """The int8 smoothing statistics: from the on-disk cache when this model was calibrated
    before, else from a calibration pass (then cached). Tensor-parallel ranks always
    calibrate: the pass runs collectives, so every rank must take the same road."""
    from scalellm.distributed.parallel_state import get_parallel_state
    from scalellm.quant import calibration_cache
    from scalellm.quant.int8 import calibrate_act_amax

    def calibrate() -> dict[str, torch.Tensor]:
        return calibrate_act_amax(model, lambda: _calibration_forward(model, args, dtype, device))

    if get_parallel_state().tp_size > 1:
        return calibrate()
    t0 = time.perf_counter()
    key = calibration_cache.cache_key(source.path, dtype=dtype, tokens=CALIBRATION_TOKENS, seed=0,
                                      arch=args.architecture)
    stats = calibration_cache.load(key)
    if stats is not None:
        logger.info("int8 calibration from cache (%.2fs)", time.perf_counter() - t0)
        return stats
    stats = calibrate()
    calibration_cache.save(key, stats)
    logger.info("int8 calibration pass: %.2fs", time.perf_counter() - t0)
    return stats


def _calibration_forward(model: torch.nn.Module, args: ModelArgs, dtype: torch.dtype, device: torch.device,
                         num_tokens: int = CALIBRATION_TOKENS, seed: int = 0) -> None:
    """One prefill over seeded random tokens, with a throw-away KV cache: shows the int8
    calibration each layer's input channels (their outliers are structural: measured on
    SmolLM2, random tokens smooth as well as real text, perplexity 28.2 vs 28.0)."""
    from scalellm.layers.attention import fresh_prompt_batch

    t = min(num_tokens, args.max_position_embeddings)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab_size, (t,), generator=gen).to(device)
    kv_heads = model.model.layers[0].self_attn.num_kv_heads
    batch = fresh_prompt_batch(t, args.num_layers, kv_heads, args.head_dim, dtype, device)
    # the torch ops throughout: the CPU kernels compile meanwhile (start_cpu_kernels), and
    # statistics that depended on when they became ready would differ from run to run
    with fused_cpu.torch_paths():
        model(ids, torch.arange(t, device=device), batch)
