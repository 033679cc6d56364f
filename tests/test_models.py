"""Our models against transformers (the reference) on tiny random-weight checkpoints."""

from __future__ import annotations

import pytest
import torch

from scalellm.layers.attention import fresh_prompt_batch
from scalellm.loader.model_source import resolve_model
from scalellm.models.args import parse_model_args
from scalellm.models.registry import get_model_class
from scalellm.protocol.errors import UnsupportedModelError

ARCHS = ["llama", "llama3_tied", "qwen2", "qwen3", "mistral"]


def _our_model(path: str):
    src = resolve_model(path)
    args = parse_model_args(src.read_config())
    model = get_model_class(args.architecture)(args, torch.float32)
    model.load_weights(src.iter_weights())
    return model, args


def _prefill_logits(model, args, ids: list[int]) -> torch.Tensor:
    t = len(ids)
    batch = fresh_prompt_batch(t, args.num_layers, args.num_kv_heads, args.head_dim, block_size=4)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(t), batch))

@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny_models, arch, cpu_kernels):
    import transformers

    path = tiny_models[arch]
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ours, args = _our_model(path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (37,), generator=g).tolist()
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0].float()
    got = _prefill_logits(ours, args, ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="GPTNeoXForCausalLM.*supported"):
        get_model_class("GPTNeoXForCausalLM")


def test_sharded_safetensors_index(tmp_path, tiny_models):
    import shutil

    import transformers

    src = tiny_models["qwen2"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    out = tmp_path / "sharded"
    ref.save_pretrained(out, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{name}", out / name)
    assert (out / "model.safetensors.index.json").exists()
    ours, args = _our_model(str(out))
    ids = list(range(5, 30))
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_prefill_logits(ours, args, ids), expected, atol=1e-4, rtol=1e-4)


def test_missing_and_unexpected_tensors_are_named(tiny_models):
    from scalellm.protocol.errors import ModelLoadError

    src = resolve_model(tiny_models["llama"])
    args = parse_model_args(src.read_config())
    weights = dict(src.iter_weights())
    model = get_model_class(args.architecture)(args, torch.float32)
    partial = {k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ModelLoadError, match="missing.*layers.1.mlp.gate_up_proj"):
        model.load_weights(partial.items())
    extra = dict(weights, **{"model.layers.0.self_attn.rope_bias": torch.zeros(3)})
    with pytest.raises(ModelLoadError, match="rope_bias"):
        model.load_weights(extra.items())
    bad_shape = dict(weights, **{"model.norm.weight": torch.zeros(3)})
    with pytest.raises(ModelLoadError, match="shape"):
        model.load_weights(bad_shape.items())
