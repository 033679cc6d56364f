"""The CPU prefill attention (layers/causal_attention_cpu.py + csrc/causal_attention_amx.c or
csrc/causal_attention_avx512.c): causal attention of fresh prompts and of chunks over a cached
context, checked on each build this CPU runs against float32 attention on the same bf16
inputs (its error no larger than torch's bf16 SDPA's), inside the engine against the torch
path it replaces (prefix-cache hits and chunked prefill included), and its build: cached per
source, off without a compiler."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from scalellm.layers import causal_attention_cpu as attn
from scalellm.layers import native

pytestmark = pytest.mark.skipif(not attn.load(), reason="no AMX or AVX-512 BF16 CPU, or no C compiler")


@pytest.fixture(params=attn.BUILDS)
def build(request, monkeypatch):
    """Each build this CPU runs (AMX, AVX-512 BF16) in turn as the loaded kernel."""
    fn = attn.open_build(request.param)
    if fn is None:
        pytest.skip(f"the {request.param} build does not run here")
    monkeypatch.setattr(attn, "_fn", fn)
    monkeypatch.setattr(attn, "_backend", request.param)
    return request.param


def _ready(llm):
    """The engine once its CPU kernels are compiled: compared runs take the same kernels from
    their first step (a fresh process compiles them in the background meanwhile)."""
    from conftest import wait_for_kernels

    wait_for_kernels(llm.engine.core.executor)
    return llm


def _attention_case(lens: list[int], h: int, hkv: int, d: int, seed: int = 0):
    """q, k, v as views into one QKV projection's rows [T, (H + 2 Hkv) D], as the engine has them."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    qkv = (torch.randn(t, (h + 2 * hkv) * d, generator=g) * 2).to(torch.bfloat16)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d: (h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
    return q, k, v


def _per_prompt(q, k, v, lens, scale, dtype):
    out, start = [], 0
    for n in lens:
        rows = slice(start, start + n)
        qp, kp, vp = (x[rows].to(dtype).transpose(0, 1)[None] for x in (q, k, v))
        r = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        out.append(r[0].transpose(0, 1).reshape(n, -1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("lens,h,hkv,d", [
    ([128] * 6, 9, 3, 64),  # SmolLM2's heads
    ([1, 5, 16, 17, 31, 33, 100, 200], 9, 3, 64),  # partial blocks of 16 and chunks of 32
    ([64, 40], 32, 8, 128),  # Llama-style heads
    ([37, 129], 4, 4, 32),  # no grouping
    ([70, 3, 48], 6, 2, 96),  # three blocks of 32 dims (a partial group of 4 on AVX-512)
])
def test_matches_float32_attention_as_closely_as_torch_bf16(build, lens, h, hkv, d):
    q, k, v = _attention_case(lens, h, hkv, d)
    scale = d ** -0.5
    out = torch.full((q.shape[0], h * d), float("nan"), dtype=torch.bfloat16)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    assert attn.run(q, k, v, out, attn.chunks(starts, lens), scale)
    exact = _per_prompt(q, k, v, lens, scale, torch.float32)
    torch_bf16 = _per_prompt(q, k, v, lens, scale, torch.bfloat16).float()
    ours_err = (out.float() - exact).abs()
    torch_err = (torch_bf16 - exact).abs()
    assert not out.isnan().any()
    assert ours_err.max() <= 1.5 * torch_err.max() + 1e-3
    assert ours_err.mean() <= 1.5 * torch_err.mean() + 1e-4


def test_chunks_over_a_cached_context_read_their_keys_by_slot(build):
    """Three chunks continuing cached contexts (keys scattered over a cache's slots) and a fresh
    prompt over its own slots, in one call; query i of a chunk sees keys 0..ctx - q_len + i."""
    h, hkv, d, scale = 9, 3, 64, 0.125
    g = torch.Generator().manual_seed(1)
    spec = [(5, 40), (16, 16), (33, 161), (1, 70)]  # (queries, keys)
    cache_k = (torch.randn(600, hkv, d, generator=g) * 2).to(torch.bfloat16)
    cache_v = (torch.randn(600, hkv, d, generator=g) * 2).to(torch.bfloat16)
    slots = torch.randperm(600, generator=g)
    q = (torch.randn(sum(n for n, _ in spec), h, d, generator=g) * 2).to(torch.bfloat16)
    out = torch.full((q.shape[0], h * d), float("nan"), dtype=torch.bfloat16)
    starts, rows, taken = [], [], 0
    for i, (n, ctx) in enumerate(spec):
        starts.append(sum(m for m, _ in spec[:i]))
        rows.append(slots[taken:taken + ctx])
        taken += ctx
    assert attn.run(q, cache_k, cache_v, out, attn.chunks(starts, [n for n, _ in spec], rows), scale)
    for (n, ctx), start, r in zip(spec, starts, rows):
        qi = q[start:start + n].transpose(0, 1)[None]
        ki, vi = cache_k[r].transpose(0, 1)[None], cache_v[r].transpose(0, 1)[None]
        mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
        exact = F.scaled_dot_product_attention(qi.float(), ki.float(), vi.float(), attn_mask=mask, scale=scale,
                                               enable_gqa=True)[0].transpose(0, 1).reshape(n, -1)
        ref = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale,
                                             enable_gqa=True)[0].transpose(0, 1).reshape(n, -1).float()
        ours = out[start:start + n].float()
        assert (ours - exact).abs().max() <= 1.5 * (ref - exact).abs().max() + 1e-3, (n, ctx)
    with pytest.raises(ValueError):
        attn.chunks([0], [5], [slots[:4]])  # fewer keys than queries


def test_leaves_rows_of_other_prompts_alone(build):
    lens = [20, 50]
    q, k, v = _attention_case([7] + lens, 9, 3, 64)
    out = torch.zeros(q.shape[0], 9 * 64, dtype=torch.bfloat16)
    assert attn.run(q, k, v, out, attn.chunks([7, 27], lens), 0.125)  # rows 0..6 belong to no prompt
    assert (out[:7] == 0).all() and (out[7:] != 0).any(dim=1).all()


def test_refuses_layouts_it_does_not_read(build):
    q, k, v = _attention_case([16], 9, 3, 64)
    out = torch.empty(16, 9 * 64, dtype=torch.bfloat16)
    prompts = attn.chunks([0], [16])
    assert not attn.run(q.float(), k.float(), v.float(), out, prompts, 0.125)
    assert not attn.run(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, out, prompts, 0.125)
    assert not attn.supports(q, 9, 3, 48)  # heads not a multiple of 32
    assert not attn.supports(q, 9, 4, 64)  # query heads not whole groups


def test_engine_with_the_kernel_generates_what_the_torch_path_does(tmp_path, monkeypatch):
    from conftest import build_tiny_model
    from scalellm import LLM, SamplingParams

    path = build_tiny_model(str(tmp_path / "llama"), "llama", hidden_size=128)  # heads of 32
    prompts = [list(range(3, 3 + n)) for n in (5, 16, 33, 70)]  # one step: four fresh prompts
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    calls = []
    run = attn.run
    monkeypatch.setattr(attn, "run", lambda *a: (calls.append(a[4].q_lens.tolist()), run(*a))[1])
    ours = [o.outputs[0].token_ids for o in _ready(LLM(path, dtype="bfloat16")).generate(prompts, params)]
    assert calls and calls[0] == [5, 16, 33, 70]  # every layer of the prefill step, all prompts at once
    monkeypatch.setattr(attn, "_fn", None)  # the torch SDPA path
    ref = [o.outputs[0].token_ids for o in _ready(LLM(path, dtype="bfloat16")).generate(prompts, params)]
    assert [list(t) for t in ours] == [list(t) for t in ref]


def test_engine_over_cached_prefixes_and_chunked_prompts_matches_the_torch_path(tmp_path, monkeypatch):
    """Prefix-cache hits and a prompt longer than the step budget: chunks that continue a cached
    context, which the kernel reads from the KV cache by slot."""
    from conftest import build_tiny_model
    from scalellm import LLM, SamplingParams

    path = build_tiny_model(str(tmp_path / "llama"), "llama", hidden_size=128)
    shared = list(range(3, 67))  # four full blocks of 16
    prompts = [shared + [70 + i, 80 + i, 90] for i in range(3)] + [list(range(5, 205))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    seen = []
    run = attn.run
    monkeypatch.setattr(attn, "run", lambda *a: (seen.append((a[4].q_lens.tolist(), a[4].ctx_lens.tolist())),
                                                 run(*a))[1])

    def generate() -> list[list[int]]:
        llm = _ready(LLM(path, dtype="bfloat16", max_num_batched_tokens=96))
        first = llm.generate(prompts[:1], params)  # fills the prefix cache
        rest = llm.generate(prompts[1:], params)
        return [list(o.outputs[0].token_ids) for o in first + rest]

    ours = generate()
    continuing = [(q, c) for qs, cs in seen for q, c in zip(qs, cs) if c > q]
    assert any(c == 67 and q == 3 for q, c in continuing)  # a prefix-cache hit: 3 new tokens over 67
    assert any(c > 96 for q, c in continuing)  # the long prompt's later chunks
    monkeypatch.setattr(attn, "_fn", None)  # the torch SDPA path
    assert generate() == ours


def test_engine_with_an_8bit_kv_cache_runs_fresh_prompts_on_the_kernel(tmp_path, monkeypatch):
    """With 8-bit K/V codes in the cache, the kernel takes the fresh prompts from the step's own
    rows; chunks over a cached context stay on the torch path (which dequantizes the codes)."""
    from conftest import build_tiny_model
    from scalellm import LLM, SamplingParams

    path = build_tiny_model(str(tmp_path / "llama"), "llama", hidden_size=128)
    shared = list(range(3, 67))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    seen = []
    run = attn.run
    monkeypatch.setattr(attn, "run", lambda *a: (seen.append((a[4].kv_index is None, a[4].q_lens.tolist())),
                                                 run(*a))[1])

    def generate() -> list[list[int]]:
        llm = _ready(LLM(path, dtype="bfloat16", kv_cache_dtype="int8"))
        outs = llm.generate([shared + [70], list(range(9, 40))], params)
        hit = llm.generate([shared + [71, 72]], params)  # a prefix-cache hit: a continuing chunk
        assert hit[0].metrics.num_cached_tokens == 64
        return [list(o.outputs[0].token_ids) for o in outs + hit]

    ours = generate()
    assert seen and all(rows for rows, _ in seen)  # keys from the step's rows, never the 8-bit cache
    assert all(lens == [65, 31] for _, lens in seen)  # the hit's 2-token chunk went to torch
    monkeypatch.setattr(attn, "_fn", None)
    assert generate() == ours


def test_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELLM_CACHE_DIR", str(tmp_path))
    compiler = native.compiler()
    source = os.path.join(native.CSRC, "causal_attention_avx512.c")
    flags = native.VNNI_FLAGS + ("-mavx512bf16",)
    path = native.build(source, compiler, flags)
    assert path is not None and path.startswith(str(tmp_path))

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    assert native.build(source, compiler, flags) == path


def test_without_a_compiler_the_torch_path_stays(monkeypatch):
    monkeypatch.setattr(attn, "_fn", None)
    monkeypatch.setattr(attn, "_tried", False)
    monkeypatch.setattr(native, "compiler", lambda: None)
    assert not attn.load()
    assert not attn.ready()
    q, k, v = _attention_case([16], 9, 3, 64)
    assert not attn.run(q, k, v, torch.empty(16, 9 * 64, dtype=torch.bfloat16), attn.chunks([0], [16]), 0.125)


def test_environment_switches_pick_the_build(monkeypatch):
    """SCALELLM_NO_CPU_ATTENTION=1: torch's SDPA; SCALELLM_NO_AMX_ATTENTION=1: the AVX-512
    build even on an AMX CPU."""
    monkeypatch.setattr(attn, "_fn", None)
    monkeypatch.setattr(attn, "_tried", False)
    monkeypatch.setenv("SCALELLM_NO_CPU_ATTENTION", "1")
    assert not attn.load() and attn.backend() == ""
    monkeypatch.delenv("SCALELLM_NO_CPU_ATTENTION")
    monkeypatch.setattr(attn, "_tried", False)
    monkeypatch.setenv("SCALELLM_NO_AMX_ATTENTION", "1")
    has_avx512 = attn.open_build("avx512") is not None
    assert attn.load() == has_avx512
    assert attn.backend() == ("avx512" if has_avx512 else "")
