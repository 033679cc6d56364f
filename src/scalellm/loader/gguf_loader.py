"""Read a single-file GGUF checkpoint as a HF-style config dict plus HF-named float32 weights.

What this module knows:
  * the GGUF metadata keys llama.cpp's `convert_hf_to_gguf.py` writes for the decoder-only
    architectures `llama`, `qwen2`, `qwen3` and `qwen3moe`, and how they map back onto the
    fields of the model's HF `config.json` (`read_gguf_config`); a `llama` file with
    `llama.expert_count` is Mixtral;
  * mixture-of-experts tensors: the router `ffn_gate_inp` and the expert stacks
    `ffn_{gate,up,down}_exps` [E, ...] (or the older per-expert `ffn_{gate,up,down}.{e}`),
    returned as the per-expert HF names of Mixtral / Qwen3-MoE checkpoints;
  * the GGUF tensor names of those architectures and their HF parameter names
    (`iter_gguf_weights`), including undoing the converter's rotary row permutation of the
    Q/K projections, which it applies to `llama` only (its Qwen2/Qwen3 classes keep the
    HF layout);
  * how Llama-3 rope scaling is stored (as a `rope_freqs.weight` tensor of per-frequency
    factors, not as metadata) and how to recover the HF `rope_scaling` dict from it.

What it does not know: the tokenizer (GGUF's `tokenizer.ggml.*` arrays are read only for
the vocab size and special ids), split GGUF files (`*-00001-of-0000N.gguf`), shared
experts (Qwen2-MoE, DeepSeek) or other architectures, the chat template, or anything about
building the model; dequantization lives in `scalellm.quant.gguf_dequant`. Every weight is
returned as float32; casting to the serving dtype is the caller's job.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from scalellm.formats.gguf_file import GGUFFile, TensorInfo, ValueType
from scalellm.protocol.errors import ModelLoadError, UnsupportedModelError

if TYPE_CHECKING:  # reading a config (the replica's frontend does) needs no torch
    import torch

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "is_gguf_file",
    "iter_gguf_weights",
    "open_gguf",
    "read_gguf_config",
    "unpermute_rotary",
]

GGUF_MAGIC = b"GGUF"

# general.architecture -> (HF model_type, HF architectures entry)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
# A `llama` file with experts (llama.expert_count) is Mixtral.
_MIXTRAL = ("mixtral", "MixtralForCausalLM")

# Architectures whose Q/K rows llama.cpp's converter permutes (LlamaModel.permute).
_PERMUTED_ARCHS = frozenset({"llama"})

# Top-level GGUF tensors -> HF names.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per-layer GGUF tensor stems ("blk.{i}.<stem>.<weight|bias>") -> HF module under layer i.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# Mixture-of-experts tensors -> HF names under layer i, for (Mixtral, Qwen3-MoE); "{e}" is the
# expert. Stacks [E, rows, cols] are split into one HF tensor per expert.
_MOE_TENSORS = {
    "ffn_gate_inp": ("block_sparse_moe.gate", "mlp.gate"),
    "ffn_gate": ("block_sparse_moe.experts.{e}.w1", "mlp.experts.{e}.gate_proj"),
    "ffn_up": ("block_sparse_moe.experts.{e}.w3", "mlp.experts.{e}.up_proj"),
    "ffn_down": ("block_sparse_moe.experts.{e}.w2", "mlp.experts.{e}.down_proj"),
}
_MOE_RE = re.compile(r"^blk\.(\d+)\.(ffn_gate_inp|ffn_gate|ffn_up|ffn_down)(_exps|\.\d+)?\.weight$")

# Tensors that hold no model parameter, skipped on purpose:
#   rope_freqs.weight   Llama-3 rope scaling factors, folded into config["rope_scaling"]
#   blk.N.attn_rot_embd rotary inv_freq cache written by some old converters
_NON_PARAMETER_RE = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?)$")

# Converter default when the HF config has no original_max_position_embeddings.
_LLAMA3_DEFAULT_ORIGINAL_CONTEXT = 8192


# ---------------------------------------------------------------------------- file access


def is_gguf_file(path: str) -> bool:
    """True when `path` is a readable file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf(path: str) -> GGUFFile:
    """A parsed, memory-mapped `GGUFFile` for `path` (shared; treat as read-only, do not close).

    Parsing walks the whole header, including the vocab and merges arrays (~50 ms for a
    49k-token vocab), so the last two parses are cached by (real path, size, mtime) and
    shared by the config reader, the weight iterator and any tokenizer code that needs the
    `tokenizer.ggml.*` arrays (`open_gguf(path).metadata`).
    """
    if not is_gguf_file(path):
        raise ModelLoadError(f"{path}: not a GGUF file (missing or no 'GGUF' magic)")
    st = os.stat(path)
    return _cached_reader(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def release_readers() -> None:
    """Forget the cached parses, so their memory maps close once nothing else holds a
    view (the engine calls this after loading: the mapped pages it read stop counting
    against its resident memory)."""
    _cached_reader.cache_clear()


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int) -> GGUFFile:
    del size, mtime_ns  # cache key only: a rewritten file gets a fresh parse
    try:
        return GGUFFile(path)
    except ModelLoadError:  # already says what is wrong, with the path
        raise
    except Exception as exc:  # anything else the parser did not foresee
        raise ModelLoadError(f"{path}: cannot parse GGUF file: {exc}") from exc


def _value(reader: GGUFFile, key: str) -> Any:
    """A scalar or string metadata value, or None when absent. Arrays are not read."""
    value = reader.metadata.get(key)
    types = reader.metadata_types.get(key)
    if value is None or types is None or types[0] == ValueType.ARRAY:
        return None
    if types[0] == ValueType.FLOAT32:
        # float32 1e-5 reads back as 9.99999974e-06: use the shortest decimal that
        # round-trips through float32, which is what config.json said.
        return float(str(np.float32(value)))
    return value  # str, bool, int or (float64) float already


def _array_len(reader: GGUFFile, key: str) -> int | None:
    value = reader.metadata.get(key)
    if value is None:
        return None
    return len(value) if isinstance(value, (list, np.ndarray)) else 1


def _architecture(reader: GGUFFile, path: str) -> str:
    arch = _value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {supported})"
        )
    return arch


def _required(reader: GGUFFile, key: str, path: str) -> Any:
    value = _value(reader, key)
    if value is None:
        raise ModelLoadError(f"{path}: GGUF metadata key {key!r} is missing")
    return value


def _tensor(reader: GGUFFile, name: str) -> TensorInfo | None:
    return reader.tensors.get(name)


# ---------------------------------------------------------------------------- config


def _head_counts(reader: GGUFFile, arch: str, path: str) -> tuple[int, int]:
    n_head = _required(reader, f"{arch}.attention.head_count", path)
    n_kv = _value(reader, f"{arch}.attention.head_count_kv")
    if n_kv is None and f"{arch}.attention.head_count_kv" in reader.metadata:
        raise UnsupportedModelError(f"{path}: per-layer head_count_kv arrays are not supported")
    return n_head, n_head if n_kv is None else n_kv


def _vocab_size(reader: GGUFFile, arch: str, path: str) -> int:
    size = _value(reader, f"{arch}.vocab_size")
    if size is not None:
        return size
    embd = _tensor(reader, "token_embd.weight")
    if embd is not None:  # the embedding's row count is what the weights need
        return int(embd.shape[0])  # torch shape (vocab, hidden)
    size = _array_len(reader, "tokenizer.ggml.tokens")
    if size is None:
        raise ModelLoadError(f"{path}: cannot tell the vocab size (no vocab_size, no tokens)")
    return size


def _llama3_rope_scaling(
    factors: np.ndarray, theta: float, head_dim: int, original_context: int
) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency factor tensor.

    The converter wrote, for wavelength w_i = 2*pi * theta**(2i/head_dim):
        1                               if w < L/high
        factor                          if w > L/low
        1 / ((1 - s)/factor + s)        otherwise, s = (L/w - low) / (high - low)
    so factor = max, and the in-between points give s as a line in L/w whose slope and
    intercept are 1/(high - low) and -low/(high - low).
    """
    factors = factors.astype(np.float64)
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv = 1.0 / factors
    mid = (inv < 1.0 - 1e-6) & (inv > 1.0 / factor + 1e-6)
    low, high = 1.0, 4.0  # converter defaults: used when there are too few points to fit
    if mid.sum() >= 2:
        i = np.arange(len(factors), dtype=np.float64)
        wavelen = 2 * math.pi * theta ** (2 * i / head_dim)
        smooth = (inv - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(original_context / wavelen[mid], smooth[mid], 1)
        low = -intercept / slope
        high = low + 1.0 / slope
    return {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": round(float(low), 4),
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": original_context,
    }


def _rope_scaling(
    reader: GGUFFile, arch: str, theta: float, head_dim: int, path: str
) -> dict[str, Any] | None:
    prefix = f"{arch}.rope.scaling."
    kind = _value(reader, prefix + "type")
    factor = _value(reader, prefix + "factor")
    orig = _value(reader, prefix + "original_context_length")
    if kind == "linear" and factor is not None:
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn" and factor is not None:
        out: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        if orig is not None:
            out["original_max_position_embeddings"] = orig
        return out
    if kind == "llama3":  # not written by llama.cpp, but accepted when a writer does
        return {
            "rope_type": "llama3",
            "factor": factor if factor is not None else 8.0,
            "low_freq_factor": _value(reader, prefix + "low_freq_factor") or 1.0,
            "high_freq_factor": _value(reader, prefix + "high_freq_factor") or 4.0,
            "original_max_position_embeddings": orig or _LLAMA3_DEFAULT_ORIGINAL_CONTEXT,
        }
    if kind not in (None, "none"):
        raise UnsupportedModelError(f"{path}: GGUF rope scaling type {kind!r} is not supported")
    freqs = _tensor(reader, "rope_freqs.weight")
    if freqs is None:
        return None
    from scalellm.quant.gguf_dequant import dequantize

    factors = dequantize(reader.tensor_data(freqs.name), freqs.ggml_type, freqs.shape, name=freqs.name)
    return _llama3_rope_scaling(
        factors.numpy().reshape(-1), theta, head_dim, orig or _LLAMA3_DEFAULT_ORIGINAL_CONTEXT
    )


def read_gguf_config(path: str) -> dict[str, Any]:
    """The HF `config.json` fields of the model in a GGUF file, from its metadata.

    Raises UnsupportedModelError for an architecture other than llama/qwen2/qwen3 and
    ModelLoadError for a missing file or missing required metadata.
    """
    reader = open_gguf(path)
    arch = _architecture(reader, path)
    model_type, hf_arch = SUPPORTED_ARCHITECTURES[arch]
    hidden = _required(reader, f"{arch}.embedding_length", path)
    n_head, n_kv = _head_counts(reader, arch, path)
    head_dim = (
        _value(reader, f"{arch}.attention.key_length")
        or _value(reader, f"{arch}.rope.dimension_count")
        or hidden // n_head
    )
    theta = _value(reader, f"{arch}.rope.freq_base") or 10000.0
    tensor_names = reader.tensors.keys()
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": _required(reader, f"{arch}.feed_forward_length", path),
        "num_hidden_layers": _required(reader, f"{arch}.block_count", path),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _required(reader, f"{arch}.attention.layer_norm_rms_epsilon", path),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, arch, theta, head_dim, path),
        "max_position_embeddings": _required(reader, f"{arch}.context_length", path),
        "vocab_size": _vocab_size(reader, arch, path),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        # Qwen2 always has q/k/v biases; for llama, trust the file.
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id"),
    }
    config |= _moe_config(reader, arch, config["num_hidden_layers"], path)
    return config


def _moe_config(reader: GGUFFile, arch: str, num_layers: int, path: str) -> dict[str, Any]:
    """Mixtral / Qwen3-MoE fields; {} for a dense model."""
    num_experts = _value(reader, f"{arch}.expert_count") or 0
    if not num_experts:
        if arch == "qwen3moe":
            raise ModelLoadError(f"{path}: GGUF metadata key 'qwen3moe.expert_count' is missing")
        return {}
    if arch not in ("llama", "qwen3moe"):
        raise UnsupportedModelError(f"{path}: mixture-of-experts {arch!r} GGUF files are not supported")
    top_k = _required(reader, f"{arch}.expert_used_count", path)
    if arch == "llama":
        return {"architectures": [_MIXTRAL[1]], "model_type": _MIXTRAL[0], "num_local_experts": num_experts,
                "num_experts_per_tok": top_k}
    dense = [i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in reader.tensors]
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": _required(reader, f"{arch}.expert_feed_forward_length", path),
        # NOTE: llama.cpp renormalises Qwen3-MoE's top-k weights unconditionally (the released
        # checkpoints say norm_topk_prob=true) and its converter does not record it; honour
        # expert_weights_norm when a writer does.
        "norm_topk_prob": _value(reader, f"{arch}.expert_weights_norm") is not False,
        "mlp_only_layers": dense,  # layers without a router, if a writer kept any dense
    }


# ---------------------------------------------------------------------------- weights


def _hf_name(gguf_name: str) -> str | None:
    """HF parameter name of a GGUF tensor; None for a known non-parameter tensor."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if _NON_PARAMETER_RE.match(gguf_name):
        return None
    m = _LAYER_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_TENSORS:
        raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no known HF parameter name")
    layer, stem, kind = m.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[stem]}.{kind}"


def unpermute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's `LlamaModel.permute` on a Q/K weight (rows) or bias.

    The converter regroups each head's rows from HF's rotate-half order [first half, second
    half] into interleaved pairs: reshape(n_head, 2, d/2, ...) then swap axes 1 and 2. The
    inverse reshapes to (n_head, d/2, 2, ...) and swaps back.
    """
    rows = weight.shape[0]
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape).contiguous()


def _moe_weights(
    match: re.Match[str], weight: torch.Tensor, is_mixtral: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of one MoE GGUF tensor: the router, or an expert stack split
    per expert ([E, rows, cols] -> E x [rows, cols], views), or one old-style expert."""
    layer, stem, suffix = match.groups()
    name = f"model.layers.{layer}.{_MOE_TENSORS[stem][0 if is_mixtral else 1]}.weight"
    if stem == "ffn_gate_inp":
        yield name, weight
    elif suffix == "_exps":
        for e in range(weight.shape[0]):
            yield name.format(e=e), weight[e]
    else:
        yield name.format(e=int(suffix[1:])), weight


def iter_gguf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, float32 tensor) for every parameter tensor, in file order.

    `lm_head.weight` appears only when the file has `output.weight` (untied head).
    Non-parameter tensors (rope_freqs) are skipped; any other unknown name raises
    ModelLoadError. Tensors are decoded one at a time from the memory-mapped file; an
    expert stack becomes one HF tensor per expert.
    """
    from scalellm.quant.gguf_dequant import dequantize

    reader = open_gguf(path)
    arch = _architecture(reader, path)
    n_head, n_kv = _head_counts(reader, arch, path)
    has_experts = bool(_value(reader, f"{arch}.expert_count"))
    for t in reader.tensors.values():
        moe = _MOE_RE.match(t.name) if has_experts else None
        if moe is not None and (moe.group(2) == "ffn_gate_inp" or moe.group(3)):
            weight = dequantize(reader.tensor_data(t.name), t.ggml_type, t.shape, name=t.name)
            yield from _moe_weights(moe, weight, arch == "llama")
            continue
        hf_name = _hf_name(t.name)
        if hf_name is None:
            continue
        # F32/F16 come as typed views, every other type as raw uint8 blocks: what
        # dequantize takes (it only looks at the bytes); both are zero-copy mmap views.
        weight = dequantize(reader.tensor_data(t.name), t.ggml_type, t.shape, name=t.name)
        if arch in _PERMUTED_ARCHS:
            if ".attn_q." in t.name:
                weight = unpermute_rotary(weight, n_head)
            elif ".attn_k." in t.name:
                weight = unpermute_rotary(weight, n_kv)
        yield hf_name, weight
