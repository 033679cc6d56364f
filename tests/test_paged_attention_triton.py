"""The GPU decode-attention kernel (layers/paged_attention_triton.py), checked without a
GPU: Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the flag must be set
before triton compiles anything) runs it on CPU tensors against a float64 reference,
and runs a whole continuously batched generation through the model runner's
block-table path against transformers' generate. On a GPU, tests/test_gpu.py runs the
same kernel compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_not_imported, requires_smollm
from scalellm.layers import paged_attention_triton

pytestmark = pytest.mark.skipif(not paged_attention_triton.available(), reason="triton is not installed")

HELPER = os.path.join(os.path.dirname(__file__), "triton_interpreted.py")


def _interpreted(*args: str) -> object:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, HELPER, *args], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernel_matches_float64_reference():
    results = _interpreted("kernel")
    assert len(results) == 6
    for r in results:
        assert r["finite"], r
        # float32 to rounding; bfloat16 inputs and output: within a bf16 ulp of values ~1
        limit = 1e-5 if "float32" in r["case"][0] else 1.6e-2
        assert r["max_err"] < limit, r


def test_prefill_kernel_matches_float64_reference():
    """All prefill chunks of a step in one launch: fresh prompts, chunks continuing a cached
    context, several query tiles; rows outside the chunks stay untouched."""
    results = _interpreted("prefill")
    assert len(results) == 3
    for r in results:
        assert r["finite"] and r["untouched"], r
        limit = 1e-5 if "float32" in r["case"][0] else 1.6e-2
        assert r["max_err"] < limit, r


def test_generation_through_block_tables_equals_transformers(tiny_models):
    import transformers

    path = tiny_models["llama"]
    got = _interpreted("generate", path)
    # decodes and prefill chunks (fresh, continued after preemption, chunked) all go through
    # the Triton kernels here
    assert got["block_tables"] is True, "the runner should take the Triton block-table path here"
    assert got["preemptions"] > 0, "the KV budget should force preemption (and recompute)"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.inference_mode():
        for prompt, tokens in zip(got["prompts"], got["tokens"]):
            x = torch.tensor([prompt])
            seq = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12,
                                 do_sample=False)
            assert tokens == seq[0, len(prompt):].tolist()


def test_not_used_on_cpu_without_the_interpreter():
    cache = torch.zeros(4, 16, 2, 32)
    assert paged_attention_triton.supports(cache, 4, 2, 32, 16) is paged_attention_triton.interpreted()


def test_fused_elementwise_kernels_match_the_torch_path():
    """RMSNorm (+residual, float32 out), SiLU-and-mul, rotary + KV write and the fp8 row
    quantiser, interpreted on bfloat16 CPU tensors, against the torch ops they replace
    (relative to the reference's max |value|)."""
    got = _interpreted("fused")
    for name in ("rms_norm_residual", "rms_norm", "silu_and_mul", "rope_q_k", "kv_cache_write"):
        assert got[name] < 0.02, (name, got)  # a few bf16 ulps (the interpreter's bf16 casts)
    assert got["rms_norm_f32_out"] < 1e-5, got
    assert got["fp8_scales"] < 1e-6, got
    assert got["fp8_dequantized"] < 0.15, got  # within an e4m3 step or two at the top of the range


@requires_smollm
def test_a_cpu_engine_never_imports_triton():
    """triton costs a process ~73 MB and ~0.2 s to import: only GPU (or interpreted) runs load it."""
    assert_not_imported("from scalellm import LLM, SamplingParams\n"
                        "LLM(None, device='cpu').generate('Hello', SamplingParams(max_tokens=3))", "triton")
