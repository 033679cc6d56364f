"""Builds the engine's parts from an EngineConfig: model source, tokenizer, worker,
scheduler, KV-cache manager. Used in-process (LLM) and in the engine-core process."""

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
    eos_token_ids: frozenset[int]
    tokenizer: Tokenizer
    source: Any  # loader.ModelSource (typed loosely: this module imports no loader at import time)
    args: Any  # models.ModelArgs


@dataclass(slots=True)
class EngineParts:
    tokenizer: Tokenizer
    core: EngineCore
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    model_name: str


def resolve_model_info(config: EngineConfig) -> ModelInfo:
    from scalellm.loader.model_source import resolve_model
    from scalellm.models.args import parse_model_args

    source = resolve_model(config.model)
    args = parse_model_args(source.read_config())
    tokenizer = load_tokenizer(source.path)
    max_model_len = config.max_model_len or args.max_position_embeddings
    if max_model_len > args.max_position_embeddings:
        raise InvalidParameterError(
            "max_model_len", f"{max_model_len} exceeds the model's {args.max_position_embeddings} positions"
        )
    if args.sliding_window and max_model_len > args.sliding_window:
        logger.warning("capping max_model_len to the sliding window %d", args.sliding_window)
        max_model_len = args.sliding_window
    eos = frozenset(tokenizer.eos_token_ids) | frozenset(args.eos_token_ids)
    return ModelInfo(source.name, source.path, max_model_len, args.vocab_size, eos, tokenizer, source, args)


def build_engine_parts(config: EngineConfig, info: ModelInfo | None = None) -> EngineParts:
    from scalellm.worker.worker import build_model_runner, num_kv_blocks, resolve_device, resolve_dtype

    info = info or resolve_model_info(config)
    source, args = info.source, info.args
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    num_blocks = num_kv_blocks(args, dtype, config.block_size, config.kv_cache_memory, info.max_model_len)
    runner = build_model_runner(
        source, args, dtype=dtype, device=device, block_size=config.block_size, num_blocks=num_blocks,
        eos_token_ids=info.eos_token_ids, seed=config.seed,
    )
    sched_cfg = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, info.max_model_len)
    kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
    core = EngineCore(Scheduler(sched_cfg, kv), runner)
    logger.info("engine ready: %s, dtype %s, %d KV blocks of %d tokens, max_model_len %d",
                source.name, dtype, num_blocks, config.block_size, info.max_model_len)
    return EngineParts(info.tokenizer, core, info.max_model_len, info.vocab_size, info.eos_token_ids, info.model_name)
