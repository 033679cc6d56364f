"""The Llama family's plain decode path (models/llama.py `_plain_decode_layers`): on the CPU
with every linear on our own kernels (AVX-512 BF16 GEMM or AMX), a step of single-token
decodes runs the layers' kernels directly. It must give the bit-same logits as the layers'
own forward, take only the steps it is made for, and stand aside for int8 wiring."""

from __future__ import annotations

import pytest
import torch

from scalellm.layers import amx_gemm, bf16_gemm


@pytest.fixture(autouse=True)
def _needs_own_kernels():
    if not (bf16_gemm.load() or amx_gemm.load()):
        pytest.skip("needs our bf16 GEMM (AVX-512 BF16 or AMX) and a C compiler")


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_decode_steps_match_the_layers_forward_bit_for_bit(tmp_path, family, monkeypatch):
    from conftest import build_tiny_model, wait_for_kernels

    from scalellm import LLM, SamplingParams
    from scalellm.models import llama

    path = build_tiny_model(str(tmp_path / family), family, hidden_size=128, intermediate_size=256)
    llm = LLM(path, dtype="bfloat16")
    wait_for_kernels(llm.engine.core.executor)
    model = llm.engine.core.executor.model
    inner = model.model
    taken, logits = [], []
    real_layers = llama._plain_decode_layers
    monkeypatch.setattr(llama, "_plain_decode_layers", lambda *a: (taken.append(a[1].shape[0]), real_layers(*a))[1])
    real_forward = model.forward

    def both(input_ids, positions, batch):
        """Every step twice: the layers' forward (plain path off), then as configured; the
        second writes the same K/V into the same slots, so the cache ends as it would."""
        inner._plain = False
        ref = real_forward(input_ids, positions, batch)
        inner._plain = None
        batch.attn.fused_index = None
        got = real_forward(input_ids, positions, batch)
        logits.append((ref, got))
        return got

    monkeypatch.setattr(model, "forward", both)
    prompts = [list(range(3, 3 + n)) for n in (5, 16, 33)]
    out = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)
    assert inner._plain is True
    assert taken and set(taken) <= {1, 2, 3} and 3 in taken  # decode steps only (the prefill step: 54 rows)
    assert all(torch.equal(ref, got) for ref, got in logits)


def test_not_taken_with_int8_wiring(tmp_path):
    from conftest import build_tiny_model, wait_for_kernels

    from scalellm import LLM, SamplingParams
    from scalellm.quant.int8 import int8_rows_available

    if not int8_rows_available():
        pytest.skip("no int8-rows chain here")
    path = build_tiny_model(str(tmp_path / "llama"), "llama", hidden_size=128, intermediate_size=256)
    llm = LLM(path, dtype="bfloat16", quantization="int8")
    wait_for_kernels(llm.engine.core.executor)
    llm.generate([[3, 4, 5]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert llm.engine.core.executor.model.model._plain is False
