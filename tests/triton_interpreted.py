"""Run under TRITON_INTERPRET=1 (tests/test_paged_attention_triton.py starts it in a
subprocess): Triton's interpreter runs the GPU decode-attention kernels on CPU tensors,
so CI checks them, and the model runner's block-table path, without a GPU.

    python tests/triton_interpreted.py kernel             -> JSON: max errors per case
    python tests/triton_interpreted.py fused              -> JSON: the fused kernels' relative errors
    python tests/triton_interpreted.py generate MODEL_DIR -> JSON: greedy token ids
"""

from __future__ import annotations

import json
import os
import sys

import torch

from scalellm.layers import paged_attention_triton as pat


def reference(q, k_cache, v_cache, tables, lens, scale):
    """Attention of each sequence's one query over its context, gathered slot by slot (float64)."""
    b, h, d = q.shape
    s, hkv = k_cache.shape[1], k_cache.shape[2]
    out = []
    for i in range(b):
        n = int(lens[i])
        slots = torch.tensor([int(tables[i, p // s]) * s + p % s for p in range(n)])
        k = k_cache.reshape(-1, hkv, d)[slots].double().repeat_interleave(h // hkv, 1)  # [n, H, D]
        v = v_cache.reshape(-1, hkv, d)[slots].double().repeat_interleave(h // hkv, 1)
        w = (torch.einsum("hd,nhd->hn", q[i].double(), k) * scale).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", w, v).reshape(-1))
    return torch.stack(out)


def kernel_cases(device: str = "cpu") -> list[dict]:
    """Each case's max |error| against `reference`; on CPU under the interpreter, or compiled
    on a GPU (tests/test_gpu.py)."""
    results = []
    g = torch.Generator().manual_seed(0)
    # (dtype, batch, heads, kv heads, head dim, block size, splits)
    cases = [(torch.float32, 3, 4, 2, 32, 16, 1), (torch.float32, 3, 4, 2, 32, 16, 3),
             (torch.float32, 4, 8, 8, 16, 8, None), (torch.float32, 2, 8, 2, 64, 32, 5),
             (torch.bfloat16, 3, 4, 1, 32, 16, 2), (torch.bfloat16, 2, 4, 2, 16, 4, None)]
    for dtype, b, h, hkv, d, s, splits in cases:
        n_blocks = 48
        kv = torch.randn(2, n_blocks, s, hkv, d, generator=g).to(dtype)
        lens = torch.tensor([1, 37, 130, 64, 200][:b], dtype=torch.int32)
        width = max(-(-int(n) // s) for n in lens) + 2
        tables = torch.stack([torch.randperm(n_blocks, generator=g)[:width] for _ in range(b)]).to(torch.int32)
        q = torch.randn(b, h + 2 * hkv, d, generator=g).to(dtype)[:, :h]  # strided rows, like qkv
        out = torch.full((b, h * d), float("nan"), dtype=dtype, device=device)
        pat.decode_attention(q.to(device), kv[0].to(device), kv[1].to(device), tables.to(device), lens.to(device),
                             d**-0.5, out, splits)
        out = out.cpu()
        ref = reference(q, kv[0], kv[1], tables, lens, d**-0.5)
        results.append({"case": [str(dtype), b, h, hkv, d, s, splits],
                        "max_err": float((out.double() - ref).abs().max()), "finite": bool(out.isfinite().all())})
    return results


def prefill_cases(device: str = "cpu") -> list[dict]:
    """The prefill kernel: several chunks in one launch (fresh prompts, chunks continuing a
    cached context, more than one query tile), against a float64 causal reference."""
    results = []
    g = torch.Generator().manual_seed(1)
    # (dtype, heads, kv heads, head dim, block size, [(q_len, ctx_len), ...])
    cases = [(torch.float32, 4, 2, 32, 16, [(5, 5), (70, 70), (3, 40), (130, 200)]),
             (torch.float32, 2, 2, 16, 4, [(17, 17), (64, 65)]),
             (torch.bfloat16, 4, 1, 32, 8, [(9, 9), (66, 130), (2, 3)])]
    for dtype, h, hkv, d, s, chunks in cases:
        n_blocks = 96
        kv = torch.randn(2, n_blocks, s, hkv, d, generator=g).to(dtype)
        width = max(-(-ctx // s) for _, ctx in chunks)
        tables = torch.stack([torch.randperm(n_blocks, generator=g)[:width] for _ in chunks]).to(torch.int32)
        total = sum(q for q, _ in chunks) + 3  # three rows before the chunks (decodes, untouched)
        q = torch.randn(total, h + 2 * hkv, d, generator=g).to(dtype)[:, :h]
        starts, row = [], 3
        for q_len, _ in chunks:
            starts.append(row)
            row += q_len
        meta = torch.tensor([starts, [c[0] for c in chunks], [c[1] for c in chunks]], dtype=torch.int32)
        out = torch.full((total, h * d), float("nan"), dtype=dtype, device=device)
        pat.prefill_attention(q.to(device), kv[0].to(device), kv[1].to(device), tables.to(device), meta.to(device),
                              max(c[0] for c in chunks), d**-0.5, out)
        out = out.cpu()
        err = 0.0
        for (q_len, ctx), start, table in zip(chunks, starts, tables):
            slots = torch.tensor([int(table[p // s]) * s + p % s for p in range(ctx)])
            k = kv[0].reshape(-1, hkv, d)[slots].double().repeat_interleave(h // hkv, 1)  # [ctx, H, D]
            v = kv[1].reshape(-1, hkv, d)[slots].double().repeat_interleave(h // hkv, 1)
            qq = q[start: start + q_len].double()  # [q_len, H, D]
            sc = torch.einsum("qhd,khd->hqk", qq, k) * d**-0.5
            pos = torch.arange(q_len).unsqueeze(1) + (ctx - q_len)
            sc = sc.masked_fill(torch.arange(ctx).unsqueeze(0) > pos, float("-inf"))
            ref = torch.einsum("hqk,khd->qhd", sc.softmax(-1), v).reshape(q_len, -1)
            err = max(err, float((out[start: start + q_len].double() - ref).abs().max()))
        results.append({"case": [str(dtype), h, hkv, d, s, chunks], "max_err": err,
                        "untouched": bool(out[:3].isnan().all()), "finite": bool(out[3:].isfinite().all())})
    return results


def fused_cases(device: str = "cpu") -> dict:
    """The fused element-wise kernels (layers/fused_gpu.py, the fp8 quantiser) against the
    torch path they replace, on bfloat16: max |difference| / max |reference| per kernel."""
    import torch.nn.functional as F

    from scalellm.layers import fused_gpu
    from scalellm.layers.norm import RMSNorm
    from scalellm.layers.rotary import RotaryEmbedding
    from scalellm.quant import fp8

    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max().clamp(min=1e-30))

    out = {}
    x = torch.randn(5, 1500, generator=g).to(dt).to(device)  # a width over one chunk, not a power of two
    r = torch.randn(5, 1500, generator=g).to(dt).to(device)
    norm = RMSNorm(1500, 1e-5, dt).to(device)
    norm.weight.data = (1 + 0.1 * torch.randn(1500, generator=g)).to(dt).to(device)
    ref_y, ref_sum = norm._norm(x + r), x + r
    y, total = fused_gpu.rms_norm(x, norm.weight, 1e-5, r)
    out["rms_norm_residual"] = max(rel(y, ref_y), rel(total, ref_sum))
    out["rms_norm"] = rel(fused_gpu.rms_norm(x, norm.weight, 1e-5), norm._norm(x))
    norm.output_float32 = True
    out["rms_norm_f32_out"] = rel(fused_gpu.rms_norm(x, norm.weight, 1e-5, None, True), norm._norm(x))
    gu = torch.randn(7, 2 * 600, generator=g).to(dt).to(device)
    out["silu_and_mul"] = rel(fused_gpu.silu_and_mul(gu), F.silu(gu[:, :600]) * gu[:, 600:])
    h, hkv, d, t = 6, 2, 32, 9
    rope = RotaryEmbedding(d, 256, 10000.0).to(device)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g).to(dt).to(device)
    pos = torch.randint(0, 256, (t,), generator=g).to(device)
    slots = torch.randperm(40, generator=g)[:t].to(device)
    kc, vc = torch.zeros(40, hkv, d, dtype=dt, device=device), torch.zeros(40, hkv, d, dtype=dt, device=device)
    ref_qk = rope.rotate(pos, qkv[:, : (h + hkv) * d].reshape(t, h + hkv, d))
    ref_v = qkv[:, (h + hkv) * d:].reshape(t, hkv, d).clone()
    fused_gpu.rope_write_kv(qkv, h, hkv, d, pos, rope.cos, rope.sin, slots, kc, vc)
    out["rope_q_k"] = rel(qkv[:, : (h + hkv) * d].reshape(t, h + hkv, d), ref_qk)
    out["kv_cache_write"] = max(rel(kc[slots], ref_qk[:, h:]), rel(vc[slots], ref_v))
    a = torch.randn(6, 512, generator=g).to(dt).to(device) * 3
    q, s = fp8.quantize_rows(a)  # the Triton quantiser here (GPU or interpreter)
    q_ref, s_ref = fp8.quantize_rows(a.cpu().float())  # the torch ops on CPU
    out["fp8_scales"] = rel(s, s_ref)
    out["fp8_dequantized"] = rel(q.float() * s, q_ref.float() * s_ref)
    return out


def generate(path: str) -> dict:
    from scalellm import LLM, SamplingParams

    llm = LLM(path, dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=24, max_num_seqs=6,
              kv_cache_memory=40 * 2048, max_model_len=80)
    runner = llm.engine.core.executor
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, llm.engine.vocab_size, (n,), generator=g).tolist() for n in (3, 7, 12, 19, 26, 33, 41, 55)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    return {"block_tables": runner.use_block_tables, "preemptions": llm.engine.stats().num_preemptions,
            "prompts": prompts, "tokens": [o.outputs[0].token_ids for o in outs]}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    if sys.argv[1] == "kernel":
        print(json.dumps(kernel_cases()))
    elif sys.argv[1] == "prefill":
        print(json.dumps(prefill_cases()))
    elif sys.argv[1] == "fused":
        print(json.dumps(fused_cases()))
    else:
        print(json.dumps(generate(sys.argv[2])))
