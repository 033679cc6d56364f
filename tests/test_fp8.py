"""fp8 linears (quant/fp8.py) on CPU, where torch's `_scaled_mm` also runs: the matmul
against a dequantised reference, smoothing that leaves the float model unchanged, and a
whole model that tracks its bf16 original. On GPU, tests/test_gpu.py checks the same
path with the Triton quantiser and CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from scalellm import LLM, SamplingParams
from scalellm.quant import fp8

pytestmark = pytest.mark.skipif(not fp8.fp8_available(torch.device("cpu")), reason="no fp8 _scaled_mm here")


def test_matmul_matches_dequantized_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g).bfloat16()
    x = torch.randn(7, 128, generator=g).bfloat16()
    fw = fp8.Fp8Weight(w)
    xq, sx = fp8.quantize_rows(x)
    ref = (xq.float() * sx) @ (fw.qweight.float() * fw.scale.view(-1, 1)).t()
    got = fw(x, None).float()
    assert torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    # and the quantisation itself is close to the float product (e4m3: ~6% per value)
    exact = x.float() @ w.float().t()
    assert (got - exact).abs().max() < 0.1 * exact.abs().max()


def test_smoothing_keeps_the_float_function():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=g)
    x[:, 3] *= 40  # an outlier channel, the case smoothing is for
    norm_w = 1 + 0.1 * torch.randn(64, generator=g)
    w = torch.randn(32, 64, generator=g)
    amax = x.abs().amax(dim=0)
    before = (x * norm_w) @ w.t()
    nw, ww = norm_w.clone(), w.clone()
    fp8.smooth_into_norm(nw, ww, amax)
    assert torch.allclose((x * nw) @ ww.t(), before, rtol=1e-4, atol=1e-4)
    assert (x * nw).abs().amax(dim=0)[3] < (x * norm_w).abs().amax(dim=0)[3] / 3  # the outlier shrank


def test_fp8_model_tracks_bf16(tiny_models):
    path = tiny_models["llama"]
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 7, 12, 19, 26, 33, 41, 55)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    bf16 = LLM(path, dtype="bfloat16", device="cpu")
    q = LLM(path, dtype="bfloat16", device="cpu", quantization="fp8")
    model = q.engine.core.executor.model
    lin = model.model.layers[0].self_attn.qkv_proj
    assert lin.fp8 is not None and lin.fp8.qweight.dtype == fp8.FP8
    ref_norm = bf16.engine.core.executor.model.model.layers[0].input_layernorm.weight
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, ref_norm), "smoothing folds into the norm"
    a = [o.outputs[0].token_ids for o in bf16.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in q.generate(prompts, params)]
    assert sum(x[0] == y[0] for x, y in zip(a, b)) >= 6, (a, b)
