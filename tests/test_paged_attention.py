"""The fused CPU decode attention (numba) against an independent dense reference."""

from __future__ import annotations

import math

import pytest
import torch

from scalellm.layers import paged_attention_cpu
from scalellm.layers.attention import Attention, AttentionMetadata, ForwardBatch

pytestmark = pytest.mark.skipif(not paged_attention_cpu.available(), reason="numba not installed")


def _paged_cache(lengths: list[int], num_kv_heads: int, head_dim: int, block_size: int, seed: int):
    """Random K/V for each sequence, scattered over shuffled blocks; returns the cache, the
    per-sequence dense K/V, and each sequence's slots."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = sum(-(-n // block_size) for n in lengths)
    num_blocks = blocks_needed + 7
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    flat_k, flat_v = cache[0].view(-1, num_kv_heads, head_dim), cache[1].view(-1, num_kv_heads, head_dim)
    seqs, at = [], 0
    for n in lengths:
        nb = -(-n // block_size)
        table = order[at:at + nb]
        at += nb
        slots = [table[p // block_size] * block_size + p % block_size for p in range(n)]
        idx = torch.tensor(slots)
        seqs.append((slots, flat_k[idx].clone(), flat_v[idx].clone()))
    return cache, seqs


def _decode_step(lengths: list[int], num_heads: int, num_kv_heads: int, head_dim: int, seed: int, qkv_seed: int):
    """One decode step over a paged cache (block size 16): the cache and the sequences (as
    `_paged_cache`), padded slots [B, Lmax] with their mask, the new tokens' slots (each
    sequence's last position), and random q [B, H, D], k_new, v_new [B, Hkv, D]."""
    cache, seqs = _paged_cache(lengths, num_kv_heads, head_dim, 16, seed=seed)
    lmax = max(lengths)
    slots = torch.zeros(len(lengths), lmax, dtype=torch.long)
    mask = torch.zeros(len(lengths), lmax, dtype=torch.bool)
    for i, (s, _, _) in enumerate(seqs):
        slots[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = True
    new_slots = torch.tensor([s[-1] for s, _, _ in seqs])
    gen = torch.Generator().manual_seed(qkv_seed)
    q = torch.randn(len(lengths), num_heads, head_dim, generator=gen)
    k_new = torch.randn(len(lengths), num_kv_heads, head_dim, generator=gen)
    v_new = torch.randn(len(lengths), num_kv_heads, head_dim, generator=gen)
    return cache, seqs, slots, mask, new_slots, (q, k_new, v_new)


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [H, D]; k, v: [L, Hkv, D] -> [H, D], written out head by head (no SDPA)
    num_heads, group = q.shape[0], q.shape[0] // k.shape[1]
    out = torch.empty_like(q)
    for h in range(num_heads):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        w = torch.softmax((kh @ q[h].double()) * scale, dim=0)
        out[h] = (w @ vh).float()
    return out


@pytest.mark.parametrize("num_heads,num_kv_heads,dtype", [(9, 3, torch.float32), (4, 4, torch.float32),
                                                          (8, 1, torch.float32), (9, 3, torch.bfloat16)])
def test_fused_decode_matches_dense(num_heads: int, num_kv_heads: int, dtype: torch.dtype) -> None:
    head_dim, block_size = 64, 16
    lengths = [1, 2, 15, 16, 17, 100, 257]
    cache, seqs = _paged_cache(lengths, num_kv_heads, head_dim, block_size, seed=num_heads)
    # a bfloat16 cache holds rounded values: the reference reads the same rounded values
    cache = cache.to(dtype)
    seqs = [(s, k.to(dtype).float(), v.to(dtype).float()) for s, k, v in seqs]
    lmax = max(lengths)
    slots = torch.zeros(len(lengths), lmax, dtype=torch.long)
    for i, (s, _, _) in enumerate(seqs):
        slots[i, :len(s)] = torch.tensor(s)
        slots[i, len(s):] = 3  # padding must be ignored whatever it points at
    q = torch.randn(len(lengths), num_heads, head_dim, generator=torch.Generator().manual_seed(1))
    scale = 1 / math.sqrt(head_dim)
    k_flat = cache[0].view(-1, num_kv_heads, head_dim)
    v_flat = cache[1].view(-1, num_kv_heads, head_dim)
    out = paged_attention_cpu.decode_attention(q, k_flat, v_flat, slots, torch.tensor(lengths), scale)
    assert out.dtype == torch.float32
    for i, (_, k, v) in enumerate(seqs):
        torch.testing.assert_close(out[i], _dense(q[i], k, v, scale), atol=2e-5, rtol=1e-4)


def test_attention_layer_uses_fused_path_and_agrees_with_gather(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's decode path: fused kernel (once compiled) and the gather + SDPA fallback
    give the same rows, and the new tokens' K/V are written to the cache before either reads it."""
    num_heads, num_kv_heads, head_dim = 9, 3, 64
    lengths = [5, 40, 33]  # context after this step, the last token of each is new
    cache, seqs, slots, mask, new_slots, (q, k_new, v_new) = _decode_step(lengths, num_heads, num_kv_heads, head_dim,
                                                                          seed=7, qkv_seed=3)
    layer = Attention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, layer_idx=0)

    def run(fused: bool) -> torch.Tensor:
        md = AttentionMetadata(slot_mapping=new_slots, num_decode_tokens=len(lengths), decode_slots=slots,
                               decode_mask=mask.view(len(lengths), 1, 1, -1),
                               decode_lens=torch.tensor(lengths) if fused else None)
        return layer(q, k_new, v_new, ForwardBatch(attn=md, kv_caches=[cache.clone()]))

    calls = []
    real = paged_attention_cpu.run
    monkeypatch.setattr(paged_attention_cpu, "run", lambda *a: calls.append(1) or real(*a))
    # not compiled yet: the layer takes the torch path instead of waiting for numba
    monkeypatch.setattr(paged_attention_cpu, "_compiled", set())
    before_compiled = run(True)
    assert calls == []
    assert paged_attention_cpu.warm_up(torch.float32, head_dim, num_heads, num_kv_heads)
    calls.clear()  # (warm_up ran the kernel once)
    fused, gathered = run(True), run(False)
    assert calls == [1]
    torch.testing.assert_close(before_compiled, gathered)
    torch.testing.assert_close(fused, gathered, atol=2e-5, rtol=1e-4)
    # and against the dense reference with the new token in place
    for i, (_, k, v) in enumerate(seqs):
        k, v = k.clone(), v.clone()
        k[-1], v[-1] = k_new[i], v_new[i]
        torch.testing.assert_close(fused[i].view(num_heads, head_dim), _dense(q[i], k, v, head_dim ** -0.5),
                                   atol=2e-5, rtol=1e-4)


def test_prefill_runs_of_equal_fresh_prompts_match_the_dense_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill chunks: runs of fresh prompts of one length go to SDPA as one batch, the rest
    (other lengths, a chunk that continues a cached context) one by one; every row matches a
    causal dense reference written out by hand."""
    from scalellm.layers.attention import PrefillChunk

    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 16, 4
    gen = torch.Generator().manual_seed(11)
    # (q_len, cached context before): a run of three 5-token prompts, a 3-token one, a run of two
    # 4-token ones, and a 4-token chunk that continues 6 cached tokens
    shapes = [(5, 0), (5, 0), (5, 0), (3, 0), (4, 0), (4, 0), (4, 6)]
    total = sum(q for q, _ in shapes)
    q = torch.randn(total, num_heads, head_dim, generator=gen)
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(total, num_kv_heads, head_dim, generator=gen)
    num_slots = 64 * block_size
    cache = torch.zeros(2, 64, block_size, num_kv_heads, head_dim)
    flat_k, flat_v = cache[0].view(num_slots, num_kv_heads, head_dim), cache[1].view(num_slots, num_kv_heads, head_dim)
    perm = torch.randperm(num_slots, generator=gen)
    chunks, slot_mapping, refs, at, used = [], [], [], 0, 0
    for q_len, cached in shapes:
        slots = perm[used:used + cached + q_len]
        used += cached + q_len
        past_k = torch.randn(cached, num_kv_heads, head_dim, generator=gen)
        past_v = torch.randn(cached, num_kv_heads, head_dim, generator=gen)
        flat_k[slots[:cached]], flat_v[slots[:cached]] = past_k, past_v
        chunks.append(PrefillChunk(at, q_len, cached + q_len, slots if cached else None))
        slot_mapping.append(slots[cached:])
        keys, values = torch.cat([past_k, k[at:at + q_len]]), torch.cat([past_v, v[at:at + q_len]])
        for i in range(q_len):  # query i sees the cached context and new tokens 0..i
            n = cached + i + 1
            refs.append(_dense(q[at + i], keys[:n], values[:n], head_dim ** -0.5))
        at += q_len
    md = AttentionMetadata(slot_mapping=torch.cat(slot_mapping), num_decode_tokens=0, decode_slots=None,
                           decode_mask=None, prefills=chunks)
    layer = Attention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, layer_idx=0)
    from scalellm.layers import attention

    batches = []
    real = attention._sdpa
    monkeypatch.setattr(attention, "_sdpa", lambda qq, *a: batches.append(qq.shape[0]) or real(qq, *a))
    out = layer(q, k, v, ForwardBatch(attn=md, kv_caches=[cache]))
    assert batches == [3, 1, 2, 1]  # the runs in one call each
    torch.testing.assert_close(out.view(total, num_heads, head_dim), torch.stack(refs), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_over_8bit_codes_matches_dense_on_the_dequantised_cache(query_dtype: torch.dtype) -> None:
    """An 8-bit cache (kv_quant: int8 codes, a float32 scale per token and KV head): the kernel
    scales each key's dot product and each value's weight by its row's scale, which is the
    dense attention over code * scale."""
    from scalellm.layers import kv_quant

    num_heads, num_kv_heads, head_dim, block_size = 9, 3, 64, 16
    lengths = [1, 16, 17, 100, 257]
    cache, seqs = _paged_cache(lengths, num_kv_heads, head_dim, block_size, seed=11)
    codes, scales = kv_quant.quantize(cache)  # [2, N, S, Hkv, D] int8, [2, N, S, Hkv]
    assert codes.dtype == torch.int8 and scales.shape == cache.shape[:-1]
    lmax = max(lengths)
    slots = torch.zeros(len(lengths), lmax, dtype=torch.long)
    for i, (s, _, _) in enumerate(seqs):
        slots[i, :len(s)] = torch.tensor(s)
    q = torch.randn(len(lengths), num_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(query_dtype)
    assert paged_attention_cpu.warm_up(torch.int8, head_dim, num_heads, num_kv_heads, query_dtype=query_dtype)
    flat = codes.view(2, -1, num_kv_heads, head_dim)
    flat_scales = scales.view(2, -1, num_kv_heads)
    assert paged_attention_cpu.supports(flat[0], num_heads)
    out = paged_attention_cpu.decode_attention(q, flat[0], flat[1], slots, torch.tensor(lengths), head_dim ** -0.5,
                                               flat_scales[0], flat_scales[1])
    assert out.dtype == query_dtype
    deq = kv_quant.dequantize(flat, flat_scales, torch.float32)
    tol = dict(atol=2e-5, rtol=1e-4) if query_dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for i, (s, _, _) in enumerate(seqs):
        idx = torch.tensor(s)
        ref = _dense(q[i].float(), deq[0][idx], deq[1][idx], head_dim ** -0.5)
        torch.testing.assert_close(out[i].float(), ref, **tol)


def test_attention_layer_over_an_8bit_cache_writes_codes_and_reads_them_back() -> None:
    """The layer with an 8-bit cache: new K/V are written as codes + scales (torch path and
    fused kernel alike), decodes read them through the kernel or the dequantising gather,
    and both agree with dense attention over the dequantised context; the codes are within
    half a step of the values written."""
    from scalellm.layers import kv_quant

    num_heads, num_kv_heads, head_dim = 9, 3, 64
    lengths = [5, 40, 33]
    cache, seqs, slots, mask, new_slots, (q, k_new, v_new) = _decode_step(lengths, num_heads, num_kv_heads, head_dim,
                                                                          seed=8, qkv_seed=4)
    codes, scales = kv_quant.quantize(cache)
    layer = Attention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, layer_idx=0)
    assert paged_attention_cpu.warm_up(torch.int8, head_dim, num_heads, num_kv_heads, query_dtype=torch.float32)

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        md = AttentionMetadata(slot_mapping=new_slots, num_decode_tokens=len(lengths), decode_slots=slots,
                               decode_mask=mask.view(len(lengths), 1, 1, -1),
                               decode_lens=torch.tensor(lengths) if fused else None)
        c, sc = codes.clone(), scales.clone()
        return layer(q, k_new, v_new, ForwardBatch(attn=md, kv_caches=[c], kv_scales=[sc])), c, sc

    fused, c, sc = run(True)
    gathered, _, _ = run(False)
    torch.testing.assert_close(fused, gathered, atol=1e-4, rtol=1e-3)
    flat, flat_scales = c.view(2, -1, num_kv_heads, head_dim), sc.view(2, -1, num_kv_heads)
    written = kv_quant.dequantize(flat[:, new_slots], flat_scales[:, new_slots], torch.float32)
    for got, want in ((written[0], k_new), (written[1], v_new)):
        assert ((got - want).abs() <= want.abs().amax(-1, keepdim=True) / 254 + 1e-6).all()
    deq = kv_quant.dequantize(flat, flat_scales, torch.float32)
    for i, (s, _, _) in enumerate(seqs):
        idx = torch.tensor(s)
        ref = _dense(q[i], deq[0][idx], deq[1][idx], head_dim ** -0.5)
        torch.testing.assert_close(fused[i].view(num_heads, head_dim), ref, atol=2e-5, rtol=1e-4)


def test_numba_target_features_prefer_512_bit_vectors_on_avx512(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where LLVM sees AVX-512, numba gets the host's features with 256-bit preference off (and
    the process that imports numba later inherits them); a value already set, or
    SCALELLM_NUMBA_ZMM=0, is left alone."""
    ll = pytest.importorskip("llvmlite.binding")
    host = ll.get_host_cpu_features()
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    monkeypatch.delenv("SCALELLM_NUMBA_ZMM", raising=False)
    got = paged_attention_cpu._vector_features()
    if host.get("avx512f"):
        assert got is not None and got.endswith(",-prefer-256-bit") and "+avx512f" in got
        assert paged_attention_cpu.os.environ["NUMBA_CPU_FEATURES"] == got
    else:
        assert got is None and "NUMBA_CPU_FEATURES" not in paged_attention_cpu.os.environ
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+sse2")
    assert paged_attention_cpu._vector_features() is None
    assert paged_attention_cpu.os.environ["NUMBA_CPU_FEATURES"] == "+sse2"
    monkeypatch.delenv("NUMBA_CPU_FEATURES")
    monkeypatch.setenv("SCALELLM_NUMBA_ZMM", "0")
    assert paged_attention_cpu._vector_features() is None
    assert "NUMBA_CPU_FEATURES" not in paged_attention_cpu.os.environ
