"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers
loaded from the same GGUF file."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import SMOLLM_GGUF, requires_smollm

pytestmark = requires_smollm

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' to Spanish.",
]


@pytest.fixture(scope="module")
def hf_model():
    import transformers

    d, f = os.path.dirname(SMOLLM_GGUF), os.path.basename(SMOLLM_GGUF)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def llm():
    from scalellm import LLM

    return LLM(dtype="float32", max_model_len=1024)


def test_default_model_is_found_without_arguments(llm):
    assert llm.engine.model_name == "SmolLM2-135M-Instruct"


def test_greedy_chat_equals_transformers(llm, hf_model):
    from scalellm import SamplingParams

    tok, model = hf_model
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=24))
    for conv, out in zip(convs, outs):
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        assert out.prompt_token_ids == list(ids)
        with torch.inference_mode():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        expected = ref[0, len(ids):].tolist()
        got = out.outputs[0].token_ids
        assert got == expected[: len(got)]
        if out.outputs[0].finish_reason == "stop":
            assert expected[len(got) - 1] in (2,)  # EOS <|im_end|>
        assert out.outputs[0].text == tok.decode(got, skip_special_tokens=True)
    assert "Paris" in outs[0].outputs[0].text
