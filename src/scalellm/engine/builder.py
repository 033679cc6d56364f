"""Builds the engine from an EngineConfig: `resolve_model_info` (model source, config,
tokenizer), then `build_engine_core` (executor: the in-process ModelRunner, or with
tensor_parallel_size > 1 a MultiprocExecutor whose rank 0 runs here; scheduler; KV-cache
manager). Used in-process (LLM) and in the
engine-core process. Checks that the model splits across the ranks before any starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from scalellm.engine.config import EngineConfig, SchedulerConfig
from scalellm.engine.core import EngineCore
from scalellm.engine.kv_cache_manager import KVCacheManager
from scalellm.engine.scheduler import Scheduler
from scalellm.protocol.errors import InvalidParameterError
from scalellm.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelInfo:
    """What a frontend needs to know of the model, without loading its weights."""

    model_name: str
    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]  # the tokenizer's and the model config's (the config's alone without a tokenizer)
    tokenizer: Tokenizer | None  # None: resolved for an engine core (which sees token ids only)
    source: Any  # loader.ModelSource (typed loosely: this module imports no loader at import time)
    args: Any  # models.ModelArgs

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, for a frontend (an info resolved with_tokenizer=False has none)."""
        if self.tokenizer is None:
            raise RuntimeError(f"model info for {self.model_name} was resolved without its tokenizer")
        return self.tokenizer


def resolve_model_info(config: EngineConfig, with_tokenizer: bool = True) -> ModelInfo:
    """with_tokenizer=False: for the engine-core process, which gets token ids (and each
    request's EOS ids) from its frontend: building SmolLM2's tokenizer from the GGUF
    vocabulary takes ~0.1 s and keeps ~30 MiB."""
    from scalellm.loader.model_source import resolve_model
    from scalellm.models.args import parse_model_args

    source = resolve_model(config.model)
    args = parse_model_args(source.read_config())
    tokenizer = load_tokenizer(source.path) if with_tokenizer else None
    max_model_len = config.max_model_len or args.max_position_embeddings
    if max_model_len > args.max_position_embeddings:
        raise InvalidParameterError(
            "max_model_len", f"{max_model_len} exceeds the model's {args.max_position_embeddings} positions"
        )
    if args.sliding_window and max_model_len > args.sliding_window:
        logger.warning("capping max_model_len to the sliding window %d", args.sliding_window)
        max_model_len = args.sliding_window
    check_parallel_fits(args, config)
    eos = frozenset(tokenizer.eos_token_ids if tokenizer is not None else ()) | frozenset(args.eos_token_ids)
    return ModelInfo(source.name, source.path, max_model_len, args.vocab_size, eos, tokenizer, source, args)


def check_parallel_fits(args: Any, config: EngineConfig) -> None:
    """Clear errors, before any rank starts, when the model does not split across
    tensor_parallel_size ranks (the layers would fail later, once per rank)."""
    tp = config.tensor_parallel_size
    name = "tensor_parallel_size"
    moe = args.moe
    if config.enable_expert_parallel and moe is None:
        raise InvalidParameterError("enable_expert_parallel", f"{args.architecture} is a dense model (no experts)")
    if tp == 1:
        return
    if args.num_heads % tp:
        raise InvalidParameterError(name, f"{args.num_heads} attention heads do not split across {tp} ranks")
    kv = args.num_kv_heads
    if kv % tp and tp % kv:
        raise InvalidParameterError(
            name, f"{kv} KV heads do not split across {tp} ranks (nor replicate: {tp} is not a multiple of {kv})"
        )
    has_dense_mlp = moe is None or bool(moe.dense_layer_ids)
    if has_dense_mlp and args.intermediate_size % tp:
        raise InvalidParameterError(name, f"MLP width {args.intermediate_size} does not split across {tp} ranks")
    if moe is not None and config.enable_expert_parallel and moe.num_experts % tp:
        raise InvalidParameterError(name, f"{moe.num_experts} experts do not split across {tp} expert-parallel ranks")
    if moe is not None and not config.enable_expert_parallel and moe.intermediate_size % tp:
        raise InvalidParameterError(
            name, f"expert width {moe.intermediate_size} does not split across {tp} ranks (try enable_expert_parallel)"
        )
    # NOTE: the vocabulary need not divide: the embedding and LM head pad the last
    # rank's slice and the gathered logits are cut back to the vocabulary size.


def build_engine_core(config: EngineConfig, info: ModelInfo) -> EngineCore:
    from scalellm.worker.worker import build_model_runner, kv_block_bytes, num_kv_blocks, resolve_device, resolve_dtype

    logger.info("engine: torch and model code imported")
    source, args = info.source, info.args
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tp = config.tensor_parallel_size
    if config.kv_cache_dtype == "int8" and device.type != "cpu":
        raise InvalidParameterError("kv_cache_dtype", "int8 runs on CPU only (the GPU kernels read the model's dtype)")
    num_blocks = num_kv_blocks(args, dtype, config.block_size, config.kv_cache_memory, info.max_model_len, tp,
                               config.kv_cache_dtype)
    executor: Any
    if tp == 1:
        executor = build_model_runner(
            source, args, dtype=dtype, device=device, block_size=config.block_size, num_blocks=num_blocks,
            seed=config.seed, quantization=config.quantization,
            cuda_graph_max_batch=0 if config.enforce_eager else config.max_num_seqs, max_model_len=info.max_model_len,
            kv_cache_dtype=config.kv_cache_dtype,
        )
    else:
        from scalellm.worker.executor import MultiprocExecutor

        if device.type == "cuda":
            import torch

            if torch.cuda.device_count() < tp:
                raise InvalidParameterError("tensor_parallel_size", f"{tp} ranks need {tp} GPUs, "
                                            f"found {torch.cuda.device_count()}")
        executor = MultiprocExecutor(
            source, args, model=config.model, tp_size=tp, expert_parallel=config.enable_expert_parallel,
            dtype=dtype, device=device, block_size=config.block_size, num_blocks=num_blocks,
            seed=config.seed,
        )
    sched_cfg = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, info.max_model_len,
                                target_step_ms=config.target_step_ms, target_ttft_ms=config.target_ttft_ms)
    resident = num_blocks
    if device.type == "cpu":  # a lazily mapped cache: the prefix cache keeps a budget of it touched
        budget = config.kv_cache_memory // 4 if config.kv_cache_resident is None else config.kv_cache_resident
        resident = min(num_blocks, budget // kv_block_bytes(args, dtype, config.block_size, tp, config.kv_cache_dtype))
    kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, resident_blocks=resident)
    core = EngineCore(Scheduler(sched_cfg, kv), executor)
    logger.info("engine ready: %s, dtype %s, %d KV blocks of %d tokens (per rank%s; %d kept touched for the prefix "
                "cache), max_model_len %d, tensor parallel %d%s", source.name, dtype, num_blocks, config.block_size,
                ", 8-bit" if config.kv_cache_dtype == "int8" else "", resident, info.max_model_len, tp,
                " (experts split across ranks)" if config.enable_expert_parallel else "")
    return core
