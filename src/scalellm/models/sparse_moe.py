"""Sparse mixture-of-experts decoders: Mixtral and Qwen3-MoE.

Both are the Llama decoder (llama.py) with the dense MLP of some layers replaced by
`layers.moe.FusedMoE`; what differs is selected by ModelArgs, as for the dense family:

    Mixtral      every layer MoE, top-k weights renormalised, checkpoint
                 `block_sparse_moe.{gate, experts.{e}.w1/w2/w3}`
    Qwen3-MoE    q/k RMSNorm (ModelArgs.qk_norm), renormalised only if norm_topk_prob,
                 dense MLP in mlp_only_layers / off the decoder_sparse_step grid,
                 checkpoint `mlp.{gate, experts.{e}.gate_proj/up_proj/down_proj}`

Checkpoint expert tensors come in two layouts, both accepted for both models:
    per expert  `...experts.{e}.{w1|gate_proj}.weight` [I, M], w3/up_proj [I, M], w2/down_proj [M, I]
                (the Hub checkpoints, and what transformers 5's save_pretrained writes)
    stacked     `...experts.gate_up_proj` [E, 2I, M], `...experts.down_proj` [E, M, I]
                (transformers 5's in-memory layout, e.g. a raw state_dict saved as safetensors)

Pure math: no requests, files or processes.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from scalellm.layers.moe import FusedMoE
from scalellm.models.args import ModelArgs
from scalellm.models.llama import LlamaForCausalLM, LlamaMLP
from scalellm.protocol.errors import ModelLoadError

_PER_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(.*\.mlp)\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$")
_SHARD_IDS = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2",
              "gate_up_proj": "w13"}


def _expert_param(shard_id: str) -> str:
    return "w2_weight" if shard_id == "w2" else "w13_weight"


class MoeForCausalLM(LlamaForCausalLM):
    """Llama decoder with FusedMoE MLPs (Mixtral, Qwen3-MoE)."""

    @staticmethod
    def make_mlp(args: ModelArgs, layer_idx: int, dtype: torch.dtype) -> nn.Module:  # type: ignore[override]
        moe = args.moe
        if moe is None:
            raise ModelLoadError(f"{args.architecture}: config has no mixture-of-experts settings")
        if layer_idx in moe.dense_layer_ids:
            return LlamaMLP(args, dtype)
        return FusedMoE(args.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k, moe.renormalize, dtype)

    def load_tensor(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> list[str]:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's module name
        if m := _PER_EXPERT.match(name):
            prefix, expert_id, shard_id = m.group(1), int(m.group(2)), _SHARD_IDS[m.group(3)]
        elif m := _STACKED.match(name):
            prefix, expert_id, shard_id = m.group(1), None, _SHARD_IDS[m.group(2)]
        else:
            return super().load_tensor(params, name, tensor)
        target = f"{prefix}.{_expert_param(shard_id)}"
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"unexpected expert tensor {name!r} in checkpoint (no parameter {target!r})")
        param.weight_loader(param, tensor, shard_id, expert_id)  # type: ignore[attr-defined]
        experts = range(self.args.moe.num_experts) if expert_id is None else [expert_id]  # type: ignore[union-attr]
        shards = ("w1", "w3") if shard_id == "w13" else (shard_id,)
        return [f"{target}#{s}@{e}" for e in experts for s in shards]

    def expected_loads(self, param_name: str) -> list[str]:
        num_experts = self.args.moe.num_experts  # type: ignore[union-attr]
        if param_name.endswith(".w13_weight"):
            return [f"{param_name}#{s}@{e}" for e in range(num_experts) for s in ("w1", "w3")]
        if param_name.endswith(".w2_weight"):
            return [f"{param_name}#w2@{e}" for e in range(num_experts)]
        return super().expected_loads(param_name)

    def read_expert_load(self, reset: bool = True) -> dict[int, list[int]]:
        """Tokens routed to each expert since the last reset: {layer index: [count per expert]}.
        Over a step's T tokens each MoE layer's counts grow by T * K."""
        return {
            i: layer.mlp.read_expert_load(reset)
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.mlp, FusedMoE)
        }
