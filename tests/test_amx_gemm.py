"""The AMX GEMM of bf16 linear layers (layers/amx_gemm.py + csrc/amx_gemm.c): every output
kind against float32 matrix products on the same bf16 inputs and against oneDNN's bf16 GEMM,
at decode and prefill row counts (partial tiles, several row blocks, non-temporal stores);
a bf16 model on it against transformers; the engine's greedy tokens against the oneDNN path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalellm.layers import amx_gemm
from scalellm.layers.linear import linear_packed, pack_onednn, silu_mul_packed

pytestmark = pytest.mark.skipif(not amx_gemm.load(), reason="no AMX CPU or no C compiler")

# decode sizes, one row tile, two row tiles with a partial second, several 512-row blocks with
# non-temporal stores (>= 512 rows) and a partial last block
ROWS = [1, 7, 16, 17, 31, 32, 33, 64, 100, 513, 1100]


def _case(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    return x, w, x.float() @ w.float().T


def _bf16_close(got: torch.Tensor, exact: torch.Tensor) -> None:
    """Within the bf16 rounding of the output (2^-8 relative) plus float32 summation-order noise."""
    err = (got.float() - exact).abs()
    assert (err <= exact.abs() * 2.0**-8 + 1e-5 * exact.abs().max()).all(), float(err.max())


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (64, 32)])
def test_bf16_and_float32_outputs_match_float32_products(m, n, k):
    x, w, exact = _case(m, n, k)
    packed = amx_gemm.pack(w)
    _bf16_close(amx_gemm.matmul(x, packed), exact)
    y32 = amx_gemm.matmul(x, packed, out_float32=True)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, exact, atol=1e-5 * float(exact.abs().max()), rtol=1e-5)
    bias = torch.randn(n).to(torch.bfloat16)
    _bf16_close(amx_gemm.matmul(x, packed, bias), exact + bias.float())


@pytest.mark.parametrize("m", [1, 33, 64, 513])
def test_same_result_as_onednn_bf16_gemm(m):
    x, w, exact = _case(m, 960, 576, seed=1)
    ours = amx_gemm.matmul(x, amx_gemm.pack(w)).float()
    theirs = linear_packed(x, pack_onednn(w), None).float()
    # both round float32 accumulators to bf16: at most one bf16 step apart (summation order)
    assert ((ours - theirs).abs() <= theirs.abs() * 2.0**-7 + 1e-6).all()


@pytest.mark.parametrize("m", ROWS)
def test_merged_gate_up_silu_mul_and_plain_product(m):
    x, w, exact = _case(m, 3072, 576, seed=2)
    packed = amx_gemm.pack(w, swiglu=True)
    _bf16_close(amx_gemm.matmul(x, packed), exact)  # [gate | up] in the checkpoint's order
    gate, up = exact.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = amx_gemm.silu_mul(x, packed)
    assert got.shape == (m, 1536)
    # float32 activation and product, rounded once (oneDNN's post-ops round the gate first)
    err = (got.float() - want).abs()
    assert (err <= want.abs() * 2.0**-8 + 1e-4 * want.abs().max()).all(), float(err.max())
    if m in (1, 64, 513):
        theirs = silu_mul_packed(x, *(pack_onednn(h.contiguous()) for h in w.chunk(2))).float()
        assert ((got.float() - theirs).abs() <= theirs.abs() * 2.0**-6 + 1e-3 * theirs.abs().max()).all()


def test_rows_read_in_place_and_leading_dims_kept():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(10, 1200, generator=g).to(torch.bfloat16)
    x = wide[:, 100:676]  # rows 1,200 apart: read where they lie
    w = (torch.randn(960, 576, generator=g) * 0.05).to(torch.bfloat16)
    _bf16_close(amx_gemm.matmul(x, amx_gemm.pack(w)), x.float() @ w.float().T)
    x3 = torch.randn(2, 5, 576, generator=g).to(torch.bfloat16)
    y3 = amx_gemm.matmul(x3, amx_gemm.pack(w))
    assert y3.shape == (2, 5, 960)
    _bf16_close(y3.reshape(10, 960), x3.reshape(10, 576).float() @ w.float().T)
    assert amx_gemm.matmul(torch.empty(0, 576, dtype=torch.bfloat16), amx_gemm.pack(w)).shape == (0, 960)


def test_refuses_what_it_does_not_compute():
    w = torch.zeros(960, 576, dtype=torch.bfloat16)
    assert amx_gemm.supports(w)
    assert not amx_gemm.supports(torch.zeros(976, 576, dtype=torch.bfloat16))  # N not a multiple of 32
    assert not amx_gemm.supports(torch.zeros(960, 560, dtype=torch.bfloat16))  # K not a multiple of 32
    assert not amx_gemm.supports(w.float())
    with pytest.raises(ValueError):
        amx_gemm.silu_mul(torch.zeros(1, 576, dtype=torch.bfloat16), amx_gemm.pack(w))
    with pytest.raises(TypeError):
        amx_gemm.matmul(torch.zeros(1, 576), amx_gemm.pack(w))


def test_bf16_model_on_the_kernel_is_as_close_to_float32_as_transformers_bf16(tmp_path):
    """A tiny Llama with every linear and the LM head on AMX tiles: its logits err from
    transformers' float32 forward no more than transformers' own bf16 forward does."""
    import transformers
    from conftest import build_tiny_model

    from scalellm.layers.attention import fresh_prompt_batch
    from scalellm.loader.model_source import resolve_model
    from scalellm.models.args import parse_model_args
    from scalellm.models.registry import get_model_class

    path = build_tiny_model(str(tmp_path / "llama"), "llama", hidden_size=128, intermediate_size=256)
    src = resolve_model(path)
    args = parse_model_args(src.read_config())
    model = get_model_class(args.architecture)(args, torch.bfloat16)
    model.load_weights(src.iter_weights())
    for module in model.modules():
        if hasattr(module, "set_packed"):
            module.set_packed()
    packed = [m.packed for m in model.modules() if getattr(m, "packed", None) is not None]
    assert len(packed) == 2 * 4 + 1 and all(isinstance(p, amx_gemm.AmxWeight) for p in packed)
    ids = torch.randint(0, args.vocab_size, (37,), generator=torch.Generator().manual_seed(4)).tolist()
    batch = fresh_prompt_batch(len(ids), args.num_layers, args.num_kv_heads, args.head_dim, block_size=4)
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), batch))
        ref32 = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        exact = ref32(torch.tensor([ids])).logits[0].float()
        ref16 = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
        theirs = ref16(torch.tensor([ids])).logits[0].float()
    assert ours.dtype == torch.float32
    bf16_err = (theirs - exact).abs().max()
    assert (ours - exact).abs().max() <= 1.25 * bf16_err
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2.5 * bf16_err  # rows whose greedy pick no bf16 forward may flip
    assert clear.sum() >= 10  # (15 of these 37 rows)
    assert torch.equal(ours.argmax(-1)[clear], exact.argmax(-1)[clear])


def test_engine_on_the_kernel_generates_what_the_onednn_path_does(tmp_path, monkeypatch):
    from conftest import build_tiny_model, wait_for_kernels

    from scalellm import LLM, SamplingParams

    path = build_tiny_model(str(tmp_path / "llama"), "llama", hidden_size=128, intermediate_size=256)
    prompts = [list(range(3, 3 + n)) for n in (5, 16, 33, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    calls = []
    run = amx_gemm._run
    monkeypatch.setattr(amx_gemm, "_run", lambda x, w, out, kind, bias: (calls.append((x.shape[0], kind)),
                                                                         run(x, w, out, kind, bias))[1])

    def generate() -> list[list[int]]:
        llm = LLM(path, dtype="bfloat16")
        wait_for_kernels(llm.engine.core.executor)  # both runs on the numba kernels from the first step
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]

    ours = generate()
    assert any(m == 124 for m, _ in calls)  # the prefill step's rows, all prompts in one call
    assert any(m == 4 for m, _ in calls)  # decode steps
    assert {kind for _, kind in calls} == {amx_gemm._KIND_BF16, amx_gemm._KIND_FP32, amx_gemm._KIND_SWIGLU}
    monkeypatch.setattr(amx_gemm, "_fn", None)  # weights packed for oneDNN instead
    calls.clear()
    ref = generate()
    assert not calls
    assert ours == ref


@pytest.mark.parametrize("m", [1, 17, 64, 600])
@pytest.mark.parametrize("n,k,parts", [(960, 576, 1), (3072, 576, 2), (576, 1536, 1)])
def test_int8_gemm_equals_onednn_int8_gemm(m, n, k, parts):
    """The int8-rows GEMM on AMX tiles: integer products and the same scaling and rounding as
    oneDNN's int8 GEMM, so every output is bit-equal, in bf16 and float32, part by part."""
    from scalellm.quant.int8 import Int8Weight, qlinear_fast

    if not qlinear_fast():
        pytest.skip("no oneDNN int8 GEMM to compare with")
    g = torch.Generator().manual_seed(m + n)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    amax = torch.rand(k, generator=g) * 4 + 0.1  # smoothing folded into the weight, as calibrated
    ours = Int8Weight(w, amax, onednn_parts=parts, backend=amx_gemm.int8_backend())
    theirs = Int8Weight(w, amax, onednn_parts=parts)
    assert isinstance(ours.backend, amx_gemm.AmxInt8Backend) and theirs.backend is None
    codes = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    for dtype in (torch.bfloat16, torch.float32):
        got, want = ours.gemm(codes, dtype), theirs.gemm(codes, dtype)
        assert len(got) == parts and all(a.dtype == dtype for a in got)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    # against integer arithmetic on the weight's codes (quant/int8.py's smoothing and rounding)
    wf = w.float()
    c = (amax.clamp(min=1e-5) ** 0.5 / wf.abs().amax(dim=0).clamp(min=1e-5) ** 0.5).clamp(min=1e-5)
    w32 = wf * c
    scales = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w32 / scales.unsqueeze(1)).clamp(-127, 127).long()
    exact = (codes.long() @ q.T).double() * scales.double()
    got32 = torch.cat(ours.gemm(codes, torch.float32), dim=-1).double()
    torch.testing.assert_close(got32, exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


def test_int8_engine_on_the_kernel_generates_what_onednn_int8_does(tmp_path, monkeypatch):
    from conftest import build_tiny_model, wait_for_kernels

    from scalellm import LLM, SamplingParams
    from scalellm.quant.int8 import qlinear_fast

    if not qlinear_fast():
        pytest.skip("no oneDNN int8 GEMM here")
    path = build_tiny_model(str(tmp_path / "llama"), "llama", hidden_size=128, intermediate_size=256)
    prompts = [list(range(3, 3 + n)) for n in (5, 16, 33, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def generate():
        llm = LLM(path, dtype="bfloat16", quantization="int8")
        wait_for_kernels(llm.engine.core.executor)  # else the first engine's first steps take torch paths
        runner = llm.engine.core.executor.runner if hasattr(llm.engine.core.executor, "runner") \
            else llm.engine.core.executor
        backends = {type(m.qweight.backend) for m in runner.model.modules() if getattr(m, "qweight", None) is not None}
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)], backends

    ours, backends = generate()
    assert backends == {amx_gemm.AmxInt8Backend}
    monkeypatch.setattr(amx_gemm, "_fn_s8", None)  # oneDNN's int8 GEMM
    ref, backends = generate()
    assert backends == {type(None)}
    assert ours == ref
