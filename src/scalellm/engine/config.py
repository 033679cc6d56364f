"""Engine configuration: frozen dataclasses, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from scalellm.protocol.errors import InvalidParameterError


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_num_seqs: int = 256  # running requests at most
    max_model_len: int = 8192  # prompt + output of one request
    decode_first: bool = True  # give running decodes budget before running prefills
    # Inter-token latency goal: while requests decode, cap a step's tokens so its predicted
    # time (a cost model fitted to the measured steps) stays near this many ms, and start
    # waiting requests only while that still holds. Bounds ITL at the price of queueing
    # newcomers. None: always the full token budget, admission limited only by max_num_seqs.
    target_step_ms: float | None = None
    # Time-to-first-token goal, with target_step_ms: while a request awaiting its first token
    # would get it later than this many ms after arriving at the capped steps' rate, steps
    # take the full token budget (admission up to 90% KV use). Bounds a burst's TTFT at the
    # price of a few long steps.
    # None: the step goal always holds.
    target_ttft_ms: float | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise InvalidParameterError("max_num_batched_tokens", "must be >= 1")
        if self.max_num_seqs < 1:
            raise InvalidParameterError("max_num_seqs", "must be >= 1")
        if self.max_model_len < 2:
            raise InvalidParameterError("max_model_len", "must be >= 2")
        if self.target_step_ms is not None and self.target_step_ms <= 0:
            raise InvalidParameterError("target_step_ms", f"must be > 0 (or unset), got {self.target_step_ms}")
        if self.target_ttft_ms is not None and self.target_ttft_ms <= 0:
            raise InvalidParameterError("target_ttft_ms", f"must be > 0 (or unset), got {self.target_ttft_ms}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0: derived from kv_cache_memory by the worker
    kv_cache_memory: int = 1 << 30  # bytes for K and V of all layers
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidParameterError("block_size", f"must be a power of two, got {self.block_size}")
        if self.kv_cache_memory <= 0 and self.num_blocks <= 0:
            raise InvalidParameterError("kv_cache_memory", "must be > 0")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything needed to build an engine. CLI flags and LLM(...) kwargs map here."""

    model: str | None = None  # HF directory or .gguf file; None: the embedded default model
    dtype: str = "auto"  # auto | float32 | bfloat16 (| float16 on GPU)
    device: str = "auto"  # auto | cpu | cuda[:N]
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes
    # bytes of KV cache the prefix cache may keep touched (CPU: the pool is mapped lazily):
    # past it, cached blocks are evicted before more memory is touched, unless live requests
    # need it (engine/block_pool.py). None: a quarter of kv_cache_memory. GPU: the whole pool.
    kv_cache_resident: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0  # seed of the shared generator for unseeded requests
    # None | "int8": dynamic W8A8 linears on fbgemm (quant/int8.py), CPU
    #      | "fp8": e4m3 W8A8 linears on torch._scaled_mm (quant/fp8.py), GPU (sm89+) or CPU
    quantization: str | None = None
    # "auto": the KV cache in the model's dtype | "int8": 8-bit codes + a float32 scale per
    # (token, KV head) row (layers/kv_quant.py), CPU, one rank: half the bytes of bf16
    kv_cache_dtype: str = "auto"
    target_step_ms: float | None = None  # SchedulerConfig.target_step_ms: bounds inter-token latency
    target_ttft_ms: float | None = None  # SchedulerConfig.target_ttft_ms: where the step goal yields to TTFT
    # ranks of one replica: rank 0 in the engine's process, 1..N-1 worker processes
    # (kv_cache_memory is per rank; checks that need the model are in engine.builder)
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE: whole experts per rank; attention stays tensor-parallel
    enforce_eager: bool = False  # GPU: no CUDA graphs for decode steps

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidParameterError("max_model_len", "must be >= 2")
        if self.quantization not in (None, "int8", "int4", "fp8"):
            raise InvalidParameterError("quantization", f"must be int8, int4, fp8 or unset, got {self.quantization!r}")
        if self.quantization is not None and self.tensor_parallel_size > 1:
            raise InvalidParameterError("quantization",
                                        f"{self.quantization} is not yet supported with tensor_parallel_size > 1")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise InvalidParameterError("kv_cache_dtype", f"must be auto or int8, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "int8" and self.tensor_parallel_size > 1:
            raise InvalidParameterError("kv_cache_dtype", "int8 is not yet supported with tensor_parallel_size > 1")
        if self.tensor_parallel_size < 1:
            raise InvalidParameterError("tensor_parallel_size", f"must be >= 1, got {self.tensor_parallel_size}")
        if self.enable_expert_parallel and self.tensor_parallel_size == 1:
            raise InvalidParameterError(
                "enable_expert_parallel", "splits experts across tensor-parallel ranks: needs tensor_parallel_size > 1"
            )
        # Reuse the part configs' validation.
        SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.max_model_len or 2,
                        target_step_ms=self.target_step_ms, target_ttft_ms=self.target_ttft_ms)
        CacheConfig(self.block_size, 0, self.kv_cache_memory, self.enable_prefix_caching)
        if self.kv_cache_resident is not None and self.kv_cache_resident < 0:
            raise InvalidParameterError("kv_cache_resident", f"must be >= 0 bytes, got {self.kv_cache_resident}")
