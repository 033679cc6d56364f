"""The Llama family decoder: Llama 2/3, Mistral, SmolLM2, Qwen2 (q/k/v bias) and
Qwen3 (q/k RMSNorm). Pure math over an explicit ForwardBatch: no requests, no
files, no processes. Sharding and checkpoint slicing belong to the layers.

    tokens [T] -> embed [T, E] -> N x (attn + mlp, pre-norm, residual) -> norm -> hidden [T, E]
    logits are computed separately, only for the rows that sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from scalellm.distributed.parallel_state import get_parallel_state
from scalellm.layers import fused_cpu
from scalellm.layers.activation import SiluAndMul
from scalellm.layers.attention import Attention, ForwardBatch
from scalellm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from scalellm.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                    linear_packed)
from scalellm.layers.norm import RMSNorm
from scalellm.layers.rotary import get_rope
from scalellm.models.args import ModelArgs
from scalellm.protocol.errors import ModelLoadError


class LlamaAttention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        d = args.head_dim
        self.qkv_proj = QKVParallelLinear(args.hidden_size, d, args.num_heads, args.num_kv_heads, args.qkv_bias, dtype)
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = d
        self.o_proj = RowParallelLinear(args.num_heads * d, args.hidden_size, args.o_bias, dtype)
        self.rotary = get_rope(d, args.max_position_embeddings, args.rope_theta, args.rope_scaling)
        self.q_norm = RMSNorm(d, args.rms_norm_eps, dtype) if args.qk_norm else None
        self.k_norm = RMSNorm(d, args.rms_norm_eps, dtype) if args.qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, d**-0.5, layer_idx)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) D]
        if self.q_norm is None or self.k_norm is None:
            return self.o_proj(self.attn.forward_qkv(qkv, positions, self.rotary, batch))  # [T, E]
        t, h, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        v = qkv[:, (h + hkv) * d:].reshape(t, hkv, d)  # [T, Hkv, D]
        q, k = qkv[:, : h * d].reshape(t, h, d), qkv[:, h * d: (h + hkv) * d].reshape(t, hkv, d)
        q, k = self.rotary(positions, self.q_norm(q), self.k_norm(k))
        return self.o_proj(self.attn(q, k, v, batch))  # [T, E]


class LlamaMLP(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            args.hidden_size, [args.intermediate_size] * 2, bias=False, dtype=dtype
        )
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(args.intermediate_size, args.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj.silu_and_mul(x)  # [T, E] -> [T, I] in the GEMMs' epilogues, where it can
        if h is None:
            h = self.act(self.gate_up_proj(x))  # [T, E] -> [T, 2I] -> [T, I]
        return self.down_proj(h)  # [T, E]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, dtype: torch.dtype, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, layer_idx, dtype)
        self.mlp = mlp if mlp is not None else LlamaMLP(args, dtype)  # MoE models pass their own
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


MlpFactory = Callable[[ModelArgs, int, torch.dtype], nn.Module]  # (args, layer index, dtype) -> MLP


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype, make_mlp: MlpFactory | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(args, i, dtype, make_mlp(args, i, dtype) if make_mlp else None)
            for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype, output_float32=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, E]
        if self._plain_layers() and self.layers[0].self_attn.attn.plain_decode_ready(x, positions, batch):
            x, residual = _plain_decode_layers(self.layers, x, positions, batch)
        else:
            residual = None
            for layer in self.layers:
                x, residual = layer(positions, x, residual, batch)
        x, _ = self.norm(x, residual)
        return x

    _plain: bool | None = None  # `_plain_layers`, once decided

    def _plain_layers(self) -> bool:
        """Whether every layer is the plain one `_plain_decode_layers` runs: one rank, the
        dense SwiGLU MLP, no q/k norm, every linear on our own kernels' packed weights and
        nothing else (layers/linear.py `own_only`: so no int8 wiring either). Decided once, at
        the first step (after the weights were packed)."""
        if self._plain is None:
            self._plain = get_parallel_state().tp_size == 1 and all(
                isinstance(layer.mlp, LlamaMLP) and layer.self_attn.q_norm is None and layer.mlp.gate_up_proj.gate_up
                and all(linear.own_only is not None for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                                   layer.mlp.gate_up_proj, layer.mlp.down_proj))
                for layer in self.layers)
        return self._plain


def _plain_decode_layers(layers: Iterable[LlamaDecoderLayer], x: torch.Tensor, positions: torch.Tensor,
                         batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder layers of a decode step, the same kernels in the same order as the layers'
    own forward takes on this path (bit-equal outputs), called directly: without the module
    calls and the checks each layer's parts make for every other path.
    NOTE: on the 2-core Zen 4 a decode step of one sequence spent ~5 ms of SmolLM2's 13-15 ms
    forward in that glue; this path saved 1.5-2.4 ms of it (a 30-layer model with nothing to
    compute: 4.1-6.0 -> 2.8-3.1 ms a forward)."""
    residual = None
    for layer in layers:
        a, mlp, ln1, ln2 = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
        if residual is None:
            residual, x = x, fused_cpu.rms_norm(x, ln1.weight, ln1.eps)
        else:
            x, residual = fused_cpu.rms_norm(x, ln1.weight, ln1.eps, residual)
        qkv = linear_packed(x, a.qkv_proj.own_only, a.qkv_proj.bias32)
        out = a.attn.plain_decode(qkv, positions, a.rotary, batch)
        x = linear_packed(out, a.o_proj.own_only, a.o_proj.bias32)
        x, residual = fused_cpu.rms_norm(x, ln2.weight, ln2.eps, residual)
        h = mlp.gate_up_proj.silu_and_mul(x)
        if h is None:  # (halves that are not whole blocks of the SwiGLU call)
            h = mlp.act(mlp.gate_up_proj(x))
        x = linear_packed(h, mlp.down_proj.own_only, mlp.down_proj.bias32)
    return x, residual


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter fragment, shard id)
    stacked_params = [
        (".q_proj.", ".qkv_proj.", "q"),
        (".k_proj.", ".qkv_proj.", "k"),
        (".v_proj.", ".qkv_proj.", "v"),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    ]

    make_mlp: MlpFactory | None = None  # None: the dense SwiGLU MLP in every layer

    def __init__(self, args: ModelArgs, dtype: torch.dtype) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args, dtype, type(self).make_mlp)
        if args.tie_word_embeddings:
            self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size, dtype)
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)  # [T, E] float32

    def norm_fed_linears(self) -> list[tuple[str, RMSNorm, nn.Module]]:
        """(linear's name, norm, linear) for every linear whose input is an RMSNorm's output
        and nothing else reads that output (a norm's weight can then absorb a per-channel
        scale of the linear's input: quantisation smoothing). An MoE layer's post-attention
        norm also feeds its router, so it is left out."""
        out = []
        for i, layer in enumerate(self.model.layers):
            out.append((f"model.layers.{i}.self_attn.qkv_proj", layer.input_layernorm, layer.self_attn.qkv_proj))
            if isinstance(layer.mlp, LlamaMLP):
                out.append((f"model.layers.{i}.mlp.gate_up_proj", layer.post_attention_layernorm,
                            layer.mlp.gate_up_proj))
        return out

    def link_int8_rows(self) -> int:
        """Wire the int8-rows chain (layers/int8_rows.py) between layers whose linears hold
        oneDNN int8 weights: each RMSNorm feeding one emits int8 rows (smoothed for it), the
        QKV projection hands its row-scaled output to the rotary pass, SiLU-mul quantises for
        `down`, and o/down hand theirs to the next residual add + RMSNorm. One rank only (a
        row-parallel linear's partial sums are reduced dense). Returns the links made."""
        if get_parallel_state().tp_size != 1:
            return 0

        def onednn(linear: nn.Module) -> bool:
            qw = getattr(linear, "qweight", None)
            return qw is not None and qw.onednn is not None

        links = 0
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if onednn(attn.qkv_proj):
                layer.input_layernorm.int8_out = True
                layer.input_layernorm.int8_smooth = attn.qkv_proj.qweight.inv_smooth
                attn.qkv_proj.rows_out = attn.q_norm is None and attn.qkv_proj.bias is None
                links += 1 + attn.qkv_proj.rows_out
            if onednn(attn.o_proj) and attn.o_proj.bias is None:
                attn.o_proj.rows_out = True  # -> post_attention_layernorm
                links += 1
            if isinstance(mlp, LlamaMLP) and onednn(mlp.gate_up_proj) and mlp.gate_up_proj.gate_up:
                layer.post_attention_layernorm.int8_out = True
                layer.post_attention_layernorm.int8_smooth = mlp.gate_up_proj.qweight.inv_smooth
                links += 1
                if onednn(mlp.down_proj):
                    mlp.gate_up_proj.silu_rows_out = True
                    mlp.gate_up_proj.silu_rows_smooth = mlp.down_proj.qweight.inv_smooth
                    mlp.down_proj.rows_out = True  # -> the next input_layernorm, or the final norm
                    links += 2
        return links

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)  # [B, V] float32

    def share_tied_embedding(self) -> int:
        """After prepacking: a tied embedding reads the LM head's GEMM blocks and its plain
        table goes (ParallelLMHead.share_with); returns the bytes freed."""
        return self.lm_head.share_with(self.model.embed_tokens) if self.args.tie_word_embeddings else 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (checkpoint name, tensor) pairs; every parameter must be covered once."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue  # derived, not a parameter
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue  # tied to the embedding
            loaded.update(self.load_tensor(params, name, tensor))
        missing = []
        for name in params:
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            missing += [e for e in self.expected_loads(name) if e not in loaded]
        if missing:
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")

    def load_tensor(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> list[str]:
        """Load one checkpoint tensor; returns the keys it covered (see expected_loads)."""
        for ckpt_part, our_part, shard_id in self.stacked_params:
            if ckpt_part in name:
                target = name.replace(ckpt_part, our_part)
                break
        else:
            target, shard_id = name, None
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"unexpected tensor {name!r} in checkpoint (no parameter {target!r})")
        param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]
        return [target if shard_id is None else f"{target}#{shard_id}"]

    def expected_loads(self, param_name: str) -> list[str]:
        """The keys load_tensor must have returned for this parameter to be complete."""
        if ".qkv_proj." in param_name:
            return [f"{param_name}#{s}" for s in "qkv"]
        if ".gate_up_proj." in param_name:
            return [f"{param_name}#{s}" for s in (0, 1)]
        return [param_name]
