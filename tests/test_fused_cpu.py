"""The fused CPU kernels (numba) against the torch paths they replace."""

from __future__ import annotations

import pytest
import torch

from scalellm.layers import amx_gemm, bf16_gemm, fused_cpu, linear, paged_attention_cpu
from scalellm.layers.activation import SiluAndMul
from scalellm.layers.norm import RMSNorm
from scalellm.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(not paged_attention_cpu.available(), reason="numba not installed")

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _compiled():
    for dtype in DTYPES:
        assert fused_cpu.warm_up(dtype)


def _torch_only(fn, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(fused_cpu, "_compiled", set())
        return fn()


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the dtype's last place at that magnitude."""
    eps = torch.finfo(a.dtype).eps
    return float(((a.float() - b.float()).abs() / (b.float().abs().clamp_min(1e-3) * eps)).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("out_float32", [False, True])
def test_rms_norm_matches_torch(dtype, tokens, out_float32, monkeypatch):
    g = torch.Generator().manual_seed(tokens)
    norm = RMSNorm(576, 1e-5, dtype, output_float32=out_float32)
    norm.weight.data = (torch.rand(576, generator=g) + 0.5).to(dtype)
    x = torch.randn(tokens, 576, generator=g).to(dtype) * 3
    res = torch.randn(tokens, 576, generator=g).to(dtype)
    normed, total = norm(x, res)
    ref_normed, ref_total = _torch_only(lambda: norm(x, res), monkeypatch)
    assert normed.dtype == ref_normed.dtype == (torch.float32 if out_float32 else dtype)
    assert torch.equal(total, ref_total)  # x + residual: the same single rounding
    # the sum of squares is summed in another order and 1/sqrt is not torch's rsqrt: a few
    # float32 ulp, which rounding to bfloat16 almost always hides
    limit = 4.0 if normed.dtype == torch.float32 else 1.0
    assert _ulps(normed, ref_normed) <= limit
    alone = norm(x)
    assert _ulps(alone, _torch_only(lambda: norm(x), monkeypatch)) <= limit
    assert not torch.equal(x, total)  # inputs untouched: the sum is a new tensor


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(dtype, monkeypatch):
    x = (torch.randn(9, 2 * 1536, generator=torch.Generator().manual_seed(0)) * 6).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated exponentials
    act = SiluAndMul()
    got = act(x)
    ref = _torch_only(lambda: act(x), monkeypatch)
    assert got.shape == (9, 1536) and got.dtype == dtype
    # fast_exp is within ~2 ulp of float32's exp: bfloat16 results agree after rounding
    # (rarely off by one bfloat16 ulp), float32 within a few ulp
    assert _ulps(got, ref) <= (1.0 if dtype == torch.bfloat16 else 8.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_matches_rotary_and_index_copy(dtype, monkeypatch):
    heads, kv_heads, dim, tokens = 9, 3, 64, 6
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    positions = torch.tensor([0, 1, 7, 100, 2047, 5])
    slots = torch.tensor([3, 0, 17, 9, 30, 31])
    rope = RotaryEmbedding(dim, 2048, 10000.0)
    cache = torch.zeros(2, 32, kv_heads, dim, dtype=dtype)

    ref_qk = rope.rotate(positions, qkv[:, : (heads + kv_heads) * dim].reshape(tokens, heads + kv_heads, dim))
    ref_cache = cache.clone()
    ref_cache[0].index_copy_(0, slots, ref_qk[:, heads:])
    ref_cache[1].index_copy_(0, slots, qkv[:, (heads + kv_heads) * dim:].reshape(tokens, kv_heads, dim))

    got = qkv.clone()
    fused_cpu.rope_write_kv(got, heads, kv_heads, dim, positions, rope.cos, rope.sin, slots, cache[0], cache[1])
    got_qk = got[:, : (heads + kv_heads) * dim].reshape(tokens, heads + kv_heads, dim)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got_qk, ref_qk, **tol)
    torch.testing.assert_close(cache, ref_cache, **tol)
    assert torch.equal(got[:, (heads + kv_heads) * dim:], qkv[:, (heads + kv_heads) * dim:])  # v untouched
    untouched = [s for s in range(32) if s not in slots.tolist()]
    assert not cache[:, untouched].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_into_8bit_codes_matches_kv_quant(dtype):
    """Into an 8-bit cache: the rotated k and the v rows are written as kv_quant's codes and
    scales (a code may differ by one where x / scale sits on a rounding boundary)."""
    from scalellm.layers import kv_quant

    heads, kv_heads, dim, tokens = 9, 3, 64, 6
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    qkv[2, (heads + kv_heads) * dim:(heads + kv_heads + 1) * dim] = 0  # an all-zero v row: scale 1
    positions = torch.tensor([0, 1, 7, 100, 2047, 5])
    slots = torch.tensor([3, 0, 17, 9, 30, 31])
    rope = RotaryEmbedding(dim, 2048, 10000.0)
    assert fused_cpu.warm_up_rope(dtype, dim, kv_codes=True) and fused_cpu.rope_ready(dtype, dim, True)
    codes = torch.zeros(2, 32, kv_heads, dim, dtype=torch.int8)
    scales = torch.zeros(2, 32, kv_heads)
    got = qkv.clone()
    fused_cpu.rope_write_kv(got, heads, kv_heads, dim, positions, rope.cos, rope.sin, slots, codes[0], codes[1],
                            scales[0], scales[1])
    k_rot = got[:, heads * dim:(heads + kv_heads) * dim].reshape(tokens, kv_heads, dim)  # as rotated in place
    v = qkv[:, (heads + kv_heads) * dim:].reshape(tokens, kv_heads, dim)
    for half, x in ((0, k_rot), (1, v)):
        want_codes, want_scales = kv_quant.quantize(x)
        torch.testing.assert_close(scales[half, slots], want_scales, atol=0, rtol=1e-6)
        assert (codes[half, slots].int() - want_codes.int()).abs().max() <= 1
    assert scales[1, slots[2], 0] == 1.0 and not codes[1, slots[2], 0].any()
    untouched = [s for s in range(32) if s not in slots.tolist()]
    assert not codes[:, untouched].any() and not scales[:, untouched].any()


def test_inverse_cdf_draw_matches_cumsum_searchsorted():
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(64, 49152, generator=g) * 3).softmax(-1)
    probs[:, 100:200] = 0
    probs[:3] *= 7.0  # rows need not be normalised
    u = torch.rand(64, dtype=torch.float64, generator=g)
    u[:2] = torch.tensor([0.0, 1.0 - 2**-53])
    got = fused_cpu.inverse_cdf_draw(probs, u)
    cdf = probs.double().cumsum(-1)
    ref = torch.searchsorted(cdf, u.unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)
    last = int(torch.nonzero(probs[1]).max())
    ref[1] = min(int(ref[1]), last)  # the very end: the last token with mass, not past it
    assert torch.equal(got, ref)
    assert bool((probs[torch.arange(64), got] > 0).all())


def _use_backend(backend: str, monkeypatch) -> None:
    """Packing for one bf16 GEMM: AMX tiles, our AVX-512 BF16 blocks or oneDNN's layout."""
    if backend == "amx" and not amx_gemm.load():
        pytest.skip("no AMX GEMM here")
    if backend != "amx":
        monkeypatch.setattr(amx_gemm, "_tried", True)
        monkeypatch.setattr(amx_gemm, "_fn", None)
    if backend == "avx512" and not bf16_gemm.load():
        pytest.skip("no AVX-512 BF16 GEMM here")
    if backend == "onednn":
        monkeypatch.setattr(bf16_gemm, "takes", lambda w: False)


@pytest.mark.skipif(not linear.onednn_packing_available(), reason="no oneDNN bf16 linear on this CPU")
@pytest.mark.parametrize("rows", [1, 3, 64, 200])
@pytest.mark.parametrize("backend", ["amx", "avx512", "onednn"])
def test_packed_bf16_linear_matches_f_linear(rows, backend, monkeypatch):
    _use_backend(backend, monkeypatch)
    g = torch.Generator().manual_seed(rows)
    layer = linear.ReplicatedLinear(576, 960, bias=True, dtype=torch.bfloat16)
    layer.weight.data = (torch.randn(960, 576, generator=g) * 0.05).bfloat16()
    layer.bias.data = torch.randn(960, generator=g).bfloat16()
    x = torch.randn(rows, 576, generator=g).bfloat16()
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    layer.set_packed()
    assert layer.weight.numel() == 0  # the plain copy is freed
    assert isinstance(layer.packed, amx_gemm.AmxWeight) == (backend == "amx")
    assert isinstance(layer.packed, bf16_gemm.Bf16Blocks) == (backend == "avx512")
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 960)
    # the same bf16 products; oneDNN may sum in another order: within a bf16 ulp or two
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=1.6e-2)


@pytest.mark.skipif(not linear.onednn_packing_available(), reason="no oneDNN bf16 linear on this CPU")
@pytest.mark.parametrize("rows", [1, 64, 300])
@pytest.mark.parametrize("backend", ["amx", "avx512", "onednn"])
def test_packed_gate_up_fuses_silu_and_mul(rows, backend, monkeypatch):
    """A [gate | up] linear packed for the AMX GEMM ((gate, up) block pairs) or half by half for
    oneDNN: silu_and_mul (the activation and the product in the GEMMs' epilogues) matches
    silu(gate) * up in float64, and a plain call still returns the merged [gate | up] output.
    (Our AVX-512 BF16 GEMM packs the pair whole; its SwiGLU call pairs the halves' blocks.)"""
    _use_backend(backend, monkeypatch)
    g = torch.Generator().manual_seed(rows)
    layer = linear.MergedColumnParallelLinear(576, [1536, 1536], bias=False, dtype=torch.bfloat16)
    layer.weight.data = (torch.randn(3072, 576, generator=g) * 0.05).bfloat16()
    x = torch.randn(rows, 576, generator=g).bfloat16()
    gu = x.double() @ layer.weight.double().t()
    ref = torch.nn.functional.silu(gu[:, :1536]) * gu[:, 1536:]
    assert layer.silu_and_mul(x) is None  # not packed yet: the caller runs the activation itself
    layer.set_packed()
    assert layer.weight.numel() == 0
    if backend == "amx":
        assert isinstance(layer.packed, amx_gemm.AmxWeight) and layer.packed.swiglu
    elif backend == "avx512":
        assert isinstance(layer.packed, bf16_gemm.Bf16Blocks) and layer.packed_halves is None
    else:
        assert layer.packed_halves is not None
    got = layer.silu_and_mul(x)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (rows, 1536)
    # one bf16 rounding of the gate, one of the product: within ~2 bf16 ulps of the exact value
    assert (got.double() - ref).abs().max() <= 1.6e-2 * ref.abs().max()
    merged = layer(x)
    torch.testing.assert_close(merged.double(), gu, atol=2e-2 * gu.abs().max().item(), rtol=1.6e-2)


def test_softmax_draw_matches_the_distribution_and_the_torch_draw():
    g = torch.Generator().manual_seed(5)
    # frequencies over many rows of one small distribution, with a banned (-inf) token
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf"), 3.0])
    temps = torch.full((40000,), 0.7)
    draws = fused_cpu.softmax_draw(logits.expand(40000, -1).contiguous(), temps,
                                   torch.rand(40000, dtype=torch.float64, generator=g))
    freq = torch.bincount(draws, minlength=6).double() / 40000
    expected = (logits.double() / 0.7).softmax(-1)
    assert freq[4] == 0
    assert (freq - expected).abs().max() < 0.01  # ~4 standard errors at 40k draws
    # row by row against softmax + float64 cumsum + searchsorted with the same uniforms
    big = torch.randn(64, 49152, generator=g) * 4
    t = torch.rand(64, generator=g) + 0.3
    u = torch.rand(64, dtype=torch.float64, generator=g)
    got = fused_cpu.softmax_draw(big, t, u)
    cdf = (big / t.unsqueeze(1)).softmax(-1).double().cumsum(-1)
    ref = torch.searchsorted(cdf, u.unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)
    assert int((got != ref).sum()) <= 1  # exp within 2 ulp: a boundary may fall differently


def test_rescore_near_max_makes_the_maximum_exact():
    g = torch.Generator().manual_seed(9)
    weight = (torch.randn(4096, 64, generator=g) * 0.3).bfloat16()
    hidden = torch.randn(256, 64, generator=g) * 3
    # near-ties: rows whose best two tokens are closer than bf16 can tell apart
    weight[7] = weight[3]
    weight[7, 0] = weight[3, 0] + 2.0**-6
    exact = hidden @ weight.float().t()
    logits = torch.nn.functional.linear(hidden.bfloat16(), weight).float()
    assert int((logits.argmax(-1) != exact.argmax(-1)).sum()) > 0  # bf16 rounding flips some
    fused_cpu.rescore_near_max(logits, hidden, weight, 2.0**-6, 1e-3)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    top = exact.argmax(-1)
    torch.testing.assert_close(logits.gather(1, top.unsqueeze(1)), exact.gather(1, top.unsqueeze(1)), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 64, 300])
@pytest.mark.parametrize("smooth,bias", [(False, False), (True, True)])
def test_int8_rows_matches_the_exact_w8a8_product(dtype, rows, smooth, bias, monkeypatch):
    """The fused W8A8 linear (row quantisation, torch._int_mm, scaling back) equals the same
    arithmetic done exactly in float64 from the same int8 operands, and Int8Weight's torch
    path (the one taken until the kernels are compiled) agrees with it."""
    from scalellm.quant.int8 import Int8Weight, int_mm_fast

    if not int_mm_fast():
        pytest.skip("no AMX / AVX512-VNNI: int8 runs on fbgemm here")
    gen = torch.Generator().manual_seed(rows)
    k, n = 96, 40
    w = torch.randn(n, k, generator=gen)
    amax = torch.rand(k, generator=gen) * 4 + 0.1 if smooth else None
    qw = Int8Weight(w, amax)
    assert qw.q is not None and qw.packed is None
    x = (torch.randn(rows, k, generator=gen) * 3).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    out = fused_cpu.int8_rows(x, qw.inv_smooth, qw.q, qw.w_scales, b)
    assert out.dtype == dtype and out.shape == (rows, n)
    # exact reference from the same definition: per-row scale, round half up, int products
    xs = x.double() * (qw.inv_smooth.double() if smooth else 1.0)
    s = (xs.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127).float().double()
    xq = torch.floor(xs / s + 0.5).clamp(-127, 127)
    ref = (xq @ qw.q.double().t()) * s * qw.w_scales.double() + (b.double() if bias else 0.0)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), atol=tol * ref.abs().max().item(), rtol=tol)
    via_torch = _torch_only(lambda: qw(x, b), monkeypatch)
    torch.testing.assert_close(via_torch.double(), out.double(), atol=2 * tol * ref.abs().max().item(), rtol=2 * tol)
    # and both are close to the float product (8-bit activations and weights)
    exact = (x.double() @ w.double().t()) + (b.double() if bias else 0.0)
    assert (out.double() - exact).abs().max() <= 0.05 * exact.abs().max()


def test_linear_runs_int8_up_to_max_rows_then_bf16(monkeypatch):
    """A linear holding both an int8 and a prepacked bf16 weight: small calls (decode batches)
    go to int8, larger ones (prefill) to bf16."""
    from scalellm.quant.int8 import int_mm_fast

    if not (int_mm_fast() and linear.onednn_packing_available()):
        pytest.skip("needs int8 units and oneDNN bf16 packing")
    lin = linear.ReplicatedLinear(64, 32, bias=False, dtype=torch.bfloat16)
    lin.weight.data.copy_(torch.randn(32, 64))
    lin.set_int8(None, keep_weight=True)
    lin.set_packed()
    calls = []
    real = fused_cpu.int8_rows
    monkeypatch.setattr(fused_cpu, "int8_rows", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    small = torch.randn(linear.INT8_MAX_ROWS, 64).to(torch.bfloat16)
    big = torch.randn(linear.INT8_MAX_ROWS + 1, 64).to(torch.bfloat16)
    lin(small), lin(big)
    assert calls == [linear.INT8_MAX_ROWS]


def _quantise_ref(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8-rows definition in float64: scale = max |row| / 127 (float32), codes rounded half up."""
    s = (y.double().abs().amax(dim=1).clamp_min(1e-12).float() / 127).double()
    return torch.floor(y.double() / s.unsqueeze(1) + 0.5).clamp(-127, 127), s


def _assert_codes(codes: torch.Tensor, scales: torch.Tensor, y: torch.Tensor) -> None:
    """codes/scales quantise y per row: scales within float32 rounding of the reference, codes
    equal to it but for values within float32 rounding of a rounding tie (at most 1 off)."""
    ref_codes, ref_scales = _quantise_ref(y)
    torch.testing.assert_close(scales.double(), ref_scales, rtol=1e-5, atol=0)
    diff = (codes.double() - ref_codes).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("smooth", [False, True])
def test_quant_rows_matches_the_per_row_definition(dtype, rows, smooth):
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 80, generator=gen) * 5).to(dtype)
    x[0, 3] = 60.0  # an outlier sets its row's scale only
    inv = torch.rand(80, generator=gen) + 0.5 if smooth else None
    codes, scales = fused_cpu.quant_rows(x, inv)
    assert codes.dtype == torch.int8 and scales.shape == (rows,)
    _assert_codes(codes, scales, x.float() * (inv if smooth else 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_scaled,residual,smooth", [(False, False, False), (True, True, True), (False, True, False),
                                                      (True, False, True)])
def test_norm_quant_is_rms_norm_then_int8_rows(dtype, x_scaled, residual, smooth):
    """RMSNorm straight to int8 rows: the kept sum (the residual stream) equals the torch path's
    (the row-scaled input rounded to the dtype, then the add rounded), and the codes quantise
    the normed rows (rounded to the dtype as the torch path does, times the weight and the
    smoothing in float32)."""
    gen = torch.Generator().manual_seed(7)
    t, e = 33, 96
    x = torch.randn(t, e, generator=gen).to(dtype)
    xs = torch.rand(t, generator=gen) + 0.5 if x_scaled else None
    res = torch.randn(t, e, generator=gen).to(dtype) if residual else None
    w = (torch.rand(e, generator=gen) + 0.5).to(dtype)
    inv = torch.rand(e, generator=gen) + 0.5 if smooth else None
    codes, scales, total = fused_cpu.norm_quant(x, xs, res, w, 1e-6, inv)
    dense = (x.float() * xs.unsqueeze(1)).to(dtype) if x_scaled else x
    ref_total = dense + res if residual else dense
    if dtype == torch.bfloat16:
        assert torch.equal(total, ref_total)
    else:  # float32 may fuse the scaling into the add (one rounding fewer)
        torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-6)
    v = ref_total.float()
    # the normed value rounded to the dtype (as the torch path), the weight applied in float32
    normed = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float() * w.float()
    _assert_codes(codes, scales, normed * (inv if smooth else 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smooth", [False, True])
def test_silu_mul_quant_applies_the_row_scale_then_quantises(dtype, smooth):
    gen = torch.Generator().manual_seed(3)
    t, i = 21, 160
    gate = (torch.randn(t, i, generator=gen) * 2).to(dtype)
    up = torch.randn(t, i, generator=gen).to(dtype)
    s = torch.rand(t, generator=gen) + 0.5
    inv = torch.rand(i, generator=gen) + 0.5 if smooth else None
    codes, scales = fused_cpu.silu_mul_quant(gate, up, s, inv)
    g, u = gate.double() * s.double().unsqueeze(1), up.double() * s.double().unsqueeze(1)
    h = torch.nn.functional.silu(g) * u * (inv.double() if smooth else 1.0)
    # the float32 SiLU (a polynomial exponential) may move a value across a rounding tie
    ref_codes, ref_scales = _quantise_ref(h)
    torch.testing.assert_close(scales.double(), ref_scales, rtol=1e-5, atol=0)
    assert (codes.double() - ref_codes).abs().max() <= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_rows_matches_torch(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 40, generator=gen).to(dtype)
    s = torch.rand(9, generator=gen) + 0.5
    b = torch.randn(40, generator=gen).to(dtype)
    assert torch.equal(fused_cpu.scale_rows(x, s), (x.float() * s.unsqueeze(1)).to(dtype))
    # (with a bias, float32 may fuse the multiply-add: one rounding fewer)
    torch.testing.assert_close(fused_cpu.scale_rows(x, s, b), (x.float() * s.unsqueeze(1)).to(dtype) + b,
                               rtol=1e-6, atol=1e-6)


_ROW_SCALED_POS = torch.tensor([0, 3, 5, 9, 2, 1])
_ROW_SCALED_SLOTS = torch.tensor([4, 0, 7, 1, 2, 3])


def _row_scaled_qkv(dtype, seed):
    """6 tokens of a 4/2-head, head size 16 QKV output with row scales still to apply: (raw,
    scales, the dense output raw * scales rounded to dtype)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(6, (4 + 2 * 2) * 16, generator=gen).to(dtype)
    s = torch.rand(6, generator=gen) + 0.5
    return raw, s, (raw.float() * s.unsqueeze(1)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_applies_row_scales_first(dtype):
    """An int8 QKV projection's output with its row scales still to apply: the kernel scales,
    rotates and writes as it would the dense output (to float32 rounding)."""
    h, hkv, d = 4, 2, 16
    raw, s, dense = _row_scaled_qkv(dtype, 11)
    rot = RotaryEmbedding(d, 64, 10000.0)
    assert fused_cpu.warm_up_rope(dtype, d)
    caches = []
    for qkv, scales in ((raw.clone(), s), (dense.clone(), None)):
        kc, vc = torch.zeros(8, hkv, d, dtype=dtype), torch.zeros(8, hkv, d, dtype=dtype)
        fused_cpu.rope_write_kv(qkv, h, hkv, d, _ROW_SCALED_POS, rot.cos, rot.sin, _ROW_SCALED_SLOTS, kc, vc,
                                row_scales=scales)
        caches.append((qkv, kc, vc))
    tol = {"rtol": 0, "atol": 2e-2 if dtype == torch.bfloat16 else 1e-5}
    for a, b in zip(caches[0], caches[1], strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_row_scales_into_an_8bit_cache(dtype):
    """Row scales and an 8-bit KV cache together: the codes and their scales are those the dense
    output would get (a code may differ by one where float32 rounding lands on a half)."""
    h, hkv, d = 4, 2, 16
    raw, s, dense = _row_scaled_qkv(dtype, 12)
    rot = RotaryEmbedding(d, 64, 10000.0)
    assert fused_cpu.warm_up_rope(dtype, d, kv_codes=True)
    out = []
    for qkv, scales in ((raw.clone(), s), (dense.clone(), None)):
        kc, vc = torch.zeros(8, hkv, d, dtype=torch.int8), torch.zeros(8, hkv, d, dtype=torch.int8)
        ks, vs = torch.zeros(8, hkv), torch.zeros(8, hkv)
        fused_cpu.rope_write_kv(qkv, h, hkv, d, _ROW_SCALED_POS, rot.cos, rot.sin, _ROW_SCALED_SLOTS, kc, vc, ks, vs,
                                row_scales=scales)
        out.append((qkv, kc, vc, ks, vs))
    (q_a, kc_a, vc_a, ks_a, vs_a), (q_b, kc_b, vc_b, ks_b, vs_b) = out
    torch.testing.assert_close(q_a.float(), q_b.float(), rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    for a, b in ((kc_a, kc_b), (vc_a, vc_b)):
        assert (a.int() - b.int()).abs().max() <= 1
    torch.testing.assert_close(ks_a, ks_b, rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(vs_a, vs_b, rtol=1e-2, atol=1e-6)
    assert vs_a[_ROW_SCALED_SLOTS].abs().min() > 0  # every token's V written


def test_numpy_views_share_memory_and_follow_moved_data():
    """The kernels' arrays: outputs allocated by numpy are the tensors' own memory (bfloat16
    as its int16 bits); a kept view of a long-lived tensor is made again when the tensor's data
    is replaced (`param.data = ...`), never read from the old memory."""
    from scalellm.layers import numpy_views

    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        t, a = numpy_views.empty((3, 4), dtype)
        assert t.dtype == dtype and t.shape == (3, 4) and a.shape == (3, 4)
        a[1, 2] = 1 if dtype == torch.int8 else (0x3F80 if dtype == torch.bfloat16 else 1.0)  # 1.0 in bf16 bits
        assert t[1, 2].item() == 1
    w = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16), requires_grad=False)
    row = numpy_views.const_bits(w, (1, -1))
    assert row.shape == (1, 8) and numpy_views.const_bits(w, (1, -1)) is row  # kept
    assert numpy_views.const_bits(w).shape == (8,)  # another shape, another view
    w.data = torch.full((8,), 2.0, dtype=torch.bfloat16)
    again = numpy_views.const_bits(w, (1, -1))
    assert again is not row and torch.equal(torch.from_numpy(again.copy()).view(torch.bfloat16), w.data.view(1, -1))
