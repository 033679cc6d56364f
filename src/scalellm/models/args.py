"""Model hyper-parameters parsed once from an HF-style config dict (config.json,
or what the GGUF reader builds from metadata)."""

from __future__ import annotations

from dataclasses import dataclass

from scalellm.protocol.errors import ModelLoadError, UnsupportedModelError


@dataclass(frozen=True, slots=True)
class MoeArgs:
    """Mixture-of-experts MLP settings (Mixtral, Qwen3-MoE)."""

    num_experts: int  # E, routed experts per MoE layer
    top_k: int  # K, experts each token is routed to
    intermediate_size: int  # I of one expert's SwiGLU
    renormalize: bool  # top-k weights rescaled to sum to 1 (Mixtral: always; Qwen3-MoE: norm_topk_prob)
    dense_layer_ids: frozenset[int]  # layers that keep a dense MLP of ModelArgs.intermediate_size


@dataclass(frozen=True, slots=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: q/k/v projections carry a bias
    o_bias: bool  # Llama attention_bias=True: o_proj too
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before rotary
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    moe: MoeArgs | None = None  # None: every layer has a dense MLP


def _require(cfg: dict, key: str) -> object:
    if key not in cfg or cfg[key] is None:
        raise ModelLoadError(f"model config is missing {key!r}")
    return cfg[key]


def _eos_ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def _moe_args(arch: str, cfg: dict, num_layers: int) -> MoeArgs | None:
    if arch == "MixtralForCausalLM":
        return MoeArgs(
            num_experts=int(_require(cfg, "num_local_experts")),  # type: ignore[arg-type]
            top_k=int(_require(cfg, "num_experts_per_tok")),  # type: ignore[arg-type]
            intermediate_size=int(_require(cfg, "intermediate_size")),  # type: ignore[arg-type]
            renormalize=True,
            dense_layer_ids=frozenset(),
        )
    if arch == "Qwen3MoeForCausalLM":
        # NOTE: Hub configs say num_experts; transformers 5 writes num_local_experts.
        num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        if not num_experts:
            raise ModelLoadError("Qwen3-MoE config is missing 'num_experts'")
        step = int(cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or ())
        dense = frozenset(i for i in range(num_layers) if i in mlp_only or (i + 1) % step != 0)
        return MoeArgs(
            num_experts=int(num_experts),
            top_k=int(_require(cfg, "num_experts_per_tok")),  # type: ignore[arg-type]
            intermediate_size=int(_require(cfg, "moe_intermediate_size")),  # type: ignore[arg-type]
            renormalize=bool(cfg.get("norm_topk_prob", False)),
            dense_layer_ids=dense,
        )
    return None


def parse_model_args(cfg: dict) -> ModelArgs:
    archs = cfg.get("architectures") or []
    if not archs:
        raise ModelLoadError("model config has no 'architectures' entry")
    arch = archs[0]
    hidden = int(_require(cfg, "hidden_size"))  # type: ignore[arg-type]
    num_heads = int(_require(cfg, "num_attention_heads"))  # type: ignore[arg-type]
    head_dim = cfg.get("head_dim") or hidden // num_heads
    is_qwen2 = arch == "Qwen2ForCausalLM"
    is_qwen3 = arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    attention_bias = bool(cfg.get("attention_bias", False))
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=True is not supported")
    uses_window = arch.startswith("Mistral") or arch == "MixtralForCausalLM"  # Qwen configs opt in
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", uses_window) else None
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    rope_params = cfg.get("rope_parameters")  # transformers >= 5 layout
    if isinstance(rope_params, dict):
        rope_theta = rope_theta or rope_params.get("rope_theta")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    num_layers = int(_require(cfg, "num_hidden_layers"))  # type: ignore[arg-type]
    return ModelArgs(
        architecture=arch,
        vocab_size=int(_require(cfg, "vocab_size")),  # type: ignore[arg-type]
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size")),  # type: ignore[arg-type]
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta or 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=attention_bias and not is_qwen2,
        qk_norm=is_qwen3,
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        moe=_moe_args(arch, cfg, num_layers),
    )
