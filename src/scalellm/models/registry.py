"""Architecture name -> model class. Unknown architectures get a clear error."""

from __future__ import annotations

from torch import nn

from scalellm.models.llama import LlamaForCausalLM
from scalellm.models.sparse_moe import MoeForCausalLM
from scalellm.protocol.errors import UnsupportedModelError

_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # q/k/v bias, selected by ModelArgs.qkv_bias
    "Qwen3ForCausalLM": LlamaForCausalLM,  # q/k norm, selected by ModelArgs.qk_norm
    "MixtralForCausalLM": MoeForCausalLM,  # mixture-of-experts MLP, ModelArgs.moe
    "Qwen3MoeForCausalLM": MoeForCausalLM,  # + q/k norm, dense layers from ModelArgs.moe
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(architecture: str) -> type[nn.Module]:
    cls = _REGISTRY.get(architecture)
    if cls is None:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        )
    return cls
