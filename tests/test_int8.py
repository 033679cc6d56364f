"""The int8 path (quant/int8.py) against float references: the matmul itself, a whole
tiny model's logits, and the engine end to end."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from scalellm.quant.int8 import Int8Weight, int8_available

pytestmark = pytest.mark.skipif(not int8_available(), reason="torch build lacks fbgemm")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_int8_matmul_is_close_and_per_row_scaled():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.1
    b = torch.randn(96)
    x = torch.randn(5, 64)
    x[2] *= 1000.0  # one huge row must not wreck the others' precision
    ref = F.linear(x, w, b)
    out = Int8Weight(w)(x, b)
    assert out.shape == (5, 96) and out.dtype == torch.float32
    for row in range(5):
        assert _rel_err(out[row], ref[row]) < 0.03, row
    assert Int8Weight(w)(x.bfloat16()).dtype == torch.bfloat16


def test_smoothing_handles_an_outlier_channel():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.1
    x = torch.randn(16, 128)
    x[:, 7] *= 300.0  # a structural outlier channel, as LLM activations have
    ref = F.linear(x, w)
    plain = _rel_err(Int8Weight(w)(x), ref)
    smooth = _rel_err(Int8Weight(w, act_amax=x.abs().amax(0))(x), ref)
    assert smooth < plain / 2 and smooth < 0.03


@torch.inference_mode()
def _all_logits(llm, ids: list[int]) -> torch.Tensor:
    from scalellm.layers.attention import fresh_prompt_batch

    model, args = llm.engine.core.executor.model, llm.engine.core.executor.args
    t = len(ids)
    batch = fresh_prompt_batch(t, args.num_layers, args.num_kv_heads, args.head_dim)
    return model.compute_logits(model(torch.tensor(ids), torch.arange(t), batch))  # [t, V]

def test_tiny_llama_int8_logits_and_generation(tiny_models):
    from scalellm import LLM, SamplingParams

    ref_llm = LLM(tiny_models["llama"], dtype="float32")
    q_llm = LLM(tiny_models["llama"], dtype="float32", quantization="int8")
    model = q_llm.engine.core.executor.model
    linears = [m for m in model.modules() if type(m).__name__.endswith("Linear")]
    assert linears and all(m.qweight is not None and m.weight.numel() == 0 for m in linears)
    ids = list(range(3, 200, 7))
    ref, out = _all_logits(ref_llm, ids), _all_logits(q_llm, ids)
    assert _rel_err(out, ref) < 0.08  # 7-bit activations on random weights: ~5%
    # the top choice agrees at most positions (random weights: many near-ties), and
    # everywhere the reference's margin is wide
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.85
    top2 = ref.topk(2, dim=-1).values
    wide = (top2[:, 0] - top2[:, 1]) > 0.5 * ref.std(dim=-1)
    assert torch.equal(out.argmax(-1)[wide], ref.argmax(-1)[wide])
    # the engine runs end to end on the int8 path (batch, chunked prefill, sampling)
    outs = q_llm.generate([ids[:9], ids[5:20]], SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]


def test_quantization_option_is_validated():
    from scalellm.engine.config import EngineConfig
    from scalellm.protocol.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="quantization"):
        EngineConfig(quantization="int3")


def test_calibration_is_cached_on_disk(tiny_models, tmp_path, monkeypatch):
    """A second start of the same model reads the calibration statistics from the cache
    instead of running the calibration pass, and quantizes to the very same weights."""
    from scalellm import LLM
    from scalellm.quant import calibration_cache
    from scalellm.worker import worker

    monkeypatch.setenv("SCALELLM_CACHE_DIR", str(tmp_path))
    passes = []
    real = worker._calibration_forward
    monkeypatch.setattr(worker, "_calibration_forward", lambda *a, **k: passes.append(1) or real(*a, **k))
    ids = list(range(3, 120, 5))
    first = LLM(tiny_models["llama"], dtype="float32", quantization="int8")
    assert passes == [1] and len(list(tmp_path.glob("int8-calibration-*.safetensors"))) == 1
    second = LLM(tiny_models["llama"], dtype="float32", quantization="int8")
    assert passes == [1]
    from conftest import wait_for_kernels

    for llm in (first, second):  # else one of them may run torch stand-ins while numba compiles
        wait_for_kernels(llm.engine.core.executor)
    assert torch.equal(_all_logits(first, ids), _all_logits(second, ids))
    # another dtype is another key; a damaged file is ignored (and recalibrated)
    assert calibration_cache.cache_key(tiny_models["llama"], dtype=torch.float32) != \
        calibration_cache.cache_key(tiny_models["llama"], dtype=torch.bfloat16)
    for f in tmp_path.glob("int8-calibration-*.safetensors"):
        f.write_bytes(b"not safetensors")
    LLM(tiny_models["llama"], dtype="float32", quantization="int8")
    assert passes == [1, 1]


def test_calibration_does_not_depend_on_the_kernels_being_ready(tiny_models, monkeypatch):
    """The CPU kernels compile in the background while the weights load and the model is
    calibrated: the calibration pass runs the torch ops throughout, so its statistics (and
    the quantised weights) are the same whether the kernels were ready or not. (Before
    `torch_paths`, a pass that found them ready midway gave another model: SmolLM2's int8
    perplexity on the stand-ins moved from +0.8% to +1.5% from one start to the next.)"""
    from scalellm.layers import fused_cpu
    from scalellm.loader.model_source import resolve_model
    from scalellm.models.args import parse_model_args
    from scalellm.models.registry import get_model_class
    from scalellm.quant.int8 import calibrate_act_amax
    from scalellm.worker import worker

    if not fused_cpu.warm_up(torch.bfloat16):
        pytest.skip("numba not installed")
    source = resolve_model(tiny_models["llama"])
    args = parse_model_args(source.read_config())
    model = get_model_class(args.architecture)(args, torch.bfloat16)
    model.load_weights(source.iter_weights())
    seen = []
    real_supports = fused_cpu.supports
    monkeypatch.setattr(fused_cpu, "supports", lambda x: seen.append(real_supports(x)) or real_supports(x))

    def stats() -> dict[str, torch.Tensor]:
        return calibrate_act_amax(model, lambda: worker._calibration_forward(model, args, torch.bfloat16,
                                                                              torch.device("cpu"), num_tokens=64))

    ready = stats()
    assert seen and not any(seen)  # asked, and told no, though compiled
    with monkeypatch.context() as m:
        m.setattr(fused_cpu, "_compiled", set())
        not_ready = stats()
    assert ready.keys() == not_ready.keys()
    assert all(torch.equal(ready[k], not_ready[k]) for k in ready)
    assert fused_cpu.supports(torch.ones(1, dtype=torch.bfloat16))  # outside the pass: yes again


def test_int8_rows_chain_in_a_bf16_model(tiny_models, monkeypatch):
    """bf16 with int8 linears on oneDNN's int8 GEMM (where the CPU has it): the norms, the rotary
    pass and SiLU-mul carry int8 rows and row scales between the GEMMs (layers/int8_rows.py).
    Its logits stay close to bf16's and to the same int8 arithmetic done by torch ops (the path
    taken before the numba kernels are compiled), and the engine runs on it end to end."""
    from scalellm import LLM, SamplingParams
    from scalellm.layers import fused_cpu
    from scalellm.quant.int8 import int8_rows_available
    from scalellm.worker.worker import _pack_weights, cpu_has_fast_bf16

    if not (int8_rows_available() and cpu_has_fast_bf16() and _pack_weights() and fused_cpu.warm_up(torch.bfloat16)):
        pytest.skip("needs an int8 GEMM for the int8-rows chain, bf16 units and the numba kernels")
    ref_llm = LLM(tiny_models["llama"], dtype="bfloat16")
    q_llm = LLM(tiny_models["llama"], dtype="bfloat16", quantization="int8")
    model = q_llm.engine.core.executor.model
    for layer in model.model.layers:
        assert layer.input_layernorm.int8_out and layer.post_attention_layernorm.int8_out
        assert layer.self_attn.qkv_proj.rows_out and layer.mlp.gate_up_proj.silu_rows_out
        assert layer.mlp.down_proj.qweight.onednn is not None and layer.mlp.down_proj.weight.numel() == 0
    calls: dict[str, int] = {}
    for name in ("norm_quant", "silu_mul_quant", "quant_rows"):
        real = getattr(fused_cpu, name)
        monkeypatch.setattr(fused_cpu, name, lambda *a, _r=real, _n=name, **k: calls.update({_n: calls.get(_n, 0) + 1})
                            or _r(*a, **k))
    ids = list(range(3, 200, 7))
    ref, out = _all_logits(ref_llm, ids), _all_logits(q_llm, ids)
    layers = len(model.model.layers)
    assert calls == {"norm_quant": 2 * layers, "silu_mul_quant": layers, "quant_rows": layers}  # o_proj's input
    assert _rel_err(out, ref) < 0.08
    top2 = ref.topk(2, dim=-1).values
    wide = (top2[:, 0] - top2[:, 1]) > 0.5 * ref.std(dim=-1)
    assert torch.equal(out.argmax(-1)[wide], ref.argmax(-1)[wide])
    with monkeypatch.context() as m:  # the same model through torch ops only
        m.setattr(fused_cpu, "_compiled", set())
        via_torch = _all_logits(q_llm, ids)
    assert _rel_err(out, via_torch) < 0.03
    outs = q_llm.generate([ids[:9], ids[5:20]], SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mixtral"])
def test_int8_rows_chain_leaves_out_what_it_cannot_carry(arch, tiny_models, tiny_moe_models):
    """Where a link cannot carry row-scaled rows (Qwen2's QKV bias, Qwen3's q/k norms, an MoE
    block after the attention), that producer hands on dense rows, and the logits stay close
    to bf16's."""
    from scalellm import LLM
    from scalellm.layers import fused_cpu
    from scalellm.quant.int8 import int8_rows_available
    from scalellm.worker.worker import _pack_weights, cpu_has_fast_bf16

    if not (int8_rows_available() and cpu_has_fast_bf16() and _pack_weights() and fused_cpu.warm_up(torch.bfloat16)):
        pytest.skip("needs an int8 GEMM for the int8-rows chain, bf16 units and the numba kernels")
    path = {**tiny_models, **tiny_moe_models}[arch]
    ref_llm = LLM(path, dtype="bfloat16")
    q_llm = LLM(path, dtype="bfloat16", quantization="int8")
    layers = q_llm.engine.core.executor.model.model.layers
    assert all(layer.input_layernorm.int8_out for layer in layers)
    if arch == "mixtral":  # the router and experts read the post-attention norm's dense rows
        assert not any(layer.post_attention_layernorm.int8_out for layer in layers)
    else:  # QKV bias / q and k norms: the projection's output leaves dense
        assert not any(layer.self_attn.qkv_proj.rows_out for layer in layers)
    ids = list(range(3, 200, 7))
    ref, out = _all_logits(ref_llm, ids), _all_logits(q_llm, ids)
    assert _rel_err(out, ref) < 0.08


def test_qlinear_fast_only_where_onednn_runs_a_native_int8_kernel():
    """qlinear_fast() picks oneDNN's int8 GEMM for the int8-rows chain. Where oneDNN would run
    its reference loop instead (torch 2.13 on AMD Zen 4: a prepacked layout only `ref_int8`
    takes, ~2,000x slower), it must say no. Checked at a SmolLM2 shape against torch._int_mm
    on the same codes: where it says yes, the call is not far slower and gives the same
    integer products (scale 1)."""
    import time

    from scalellm.quant.int8 import Int8Weight, int_mm_fast, qlinear_fast

    if not int_mm_fast():
        pytest.skip("no int8 units (torch._int_mm would be slow too)")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=g)
    codes = torch.randint(-127, 128, (64, 576), dtype=torch.int8, generator=g)
    iw = Int8Weight(w, onednn_parts=0)
    assert iw.q is not None
    ref = torch._int_mm(codes, iw.q.t()).float() * iw.w_scales
    t0 = time.perf_counter()
    torch._int_mm(codes, iw.q.t())
    int_mm_s = time.perf_counter() - t0
    if not qlinear_fast():
        return
    rows = Int8Weight(w, onednn_parts=1)
    out = rows.gemm(codes, torch.float32)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)
    t0 = time.perf_counter()
    rows.gemm(codes, torch.float32)
    assert time.perf_counter() - t0 < 20 * int_mm_s + 5e-3


@pytest.mark.parametrize("rows", [1, 3, 5, 6, 7, 16, 17, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kernel", ["vnni", "int_mm"])
@pytest.mark.parametrize("shape", [(384, 576), (200, 36)])  # parts of 192 and of 100 channels (not whole blocks)
def test_int_mm_backend_is_exact_integer_products_times_channel_scales(rows, dtype, kernel, shape, monkeypatch):
    """The int8-rows chain's GEMM where neither the AMX kernel nor a native oneDNN int8 linear
    runs (our VNNI GEMM where it builds, else torch._int_mm and the channel scales): each
    output is the exact integer dot product of a row's codes with a channel's codes, times the
    channel's scale in float32, rounded once to dtype; through the numba pass and through
    torch ops alike, and from codes with a row stride wider than K."""
    from scalellm.layers import fused_cpu, int_mm_backend, native
    from scalellm.layers.int_mm_backend import IntMmInt8Backend
    from scalellm.quant.int8 import Int8Weight, int_mm_fast

    if not int_mm_fast():
        pytest.skip("no int8 units")
    if kernel == "vnni":
        if not (native.cpu_has_vnni() and native.compiler() is not None):
            pytest.skip("no AVX-512 VNNI or no C compiler")
        assert int_mm_backend.load_gemm()
    else:
        monkeypatch.setattr(int_mm_backend, "load_gemm", lambda: False)
    g = torch.Generator().manual_seed(rows)
    n, k = shape
    w = torch.randn(n, k, generator=g)
    codes = torch.randint(-127, 128, (rows, k + 64), dtype=torch.int8, generator=g)[:, 32:32 + k]  # strided rows
    iw = Int8Weight(w, onednn_parts=2, backend=IntMmInt8Backend())
    assert iw.backend is not None and len(iw.onednn) == 2
    assert all((p.blocks is not None) == (kernel == "vnni") for p in iw.onednn)
    q = torch.round(w / (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)).clamp(-127, 127)
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    exact = (codes.double() @ q.double().t())  # integers, exact in float64
    want = (exact.float() * scales).to(dtype)
    fused_cpu.warm_up(dtype if dtype == torch.bfloat16 else torch.float32)
    for torch_only in (False, True):
        with fused_cpu.torch_paths() if torch_only else contextlib.nullcontext():
            got = torch.cat(iw.gemm(codes, dtype), dim=-1)
        assert got.dtype == dtype and torch.equal(got, want), (torch_only, (got.float() - want.float()).abs().max())


def test_qlinear_probe_says_no_on_a_busy_cpu_where_onednn_is_not_native():
    """The probe behind qlinear_fast() must not mistake oneDNN's reference loop for a native
    kernel when the CPU is busy (a server's start compiles numba kernels beside it): a first
    version did in 4 of 6 tries on AMD Zen 4, and int8 then served at minutes an answer."""
    import subprocess
    import sys

    from scalellm.quant import int8

    if not int8.int_mm_fast() or int8._qlinear_native():
        pytest.skip("oneDNN's int8 GEMM is native here (or no int8 units): nothing to mistake")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        assert not any(int8._qlinear_native.__wrapped__() for _ in range(4))
    finally:
        for p in busy:
            p.kill()
            p.wait()
