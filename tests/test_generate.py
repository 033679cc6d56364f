"""End-to-end greedy generation in one continuously batched workload against
transformers' `generate`, with a block size, token budget and KV budget small
enough that chunked prefill, mixed steps and preemption all happen."""

from __future__ import annotations

import pytest
import torch

from scalellm import LLM, SamplingParams

ARCHS = ["llama", "llama3_tied", "qwen2", "qwen3", "mistral"]
PROMPT_LENS = [3, 7, 12, 19, 26, 33, 41, 55]
NEW_TOKENS = 12


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _reference(path: str, prompts: list[list[int]]) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    outs = []
    with torch.inference_mode():
        for p in prompts:
            seq = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            outs.append(seq[0, len(p):].tolist())
    return outs


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_equals_transformers(tiny_models, arch, cpu_kernels):
    path = tiny_models[arch]
    # 2 layers * 2 KV heads * 16 dims * 2 (K, V) * 4 bytes = 512 B/token; blocks of 4 tokens = 2 KiB.
    llm = LLM(path, dtype="float32", block_size=4, max_num_batched_tokens=24, max_num_seqs=6,
              kv_cache_memory=40 * 2048, max_model_len=80)
    prompts = _prompts(llm.engine.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0, "the KV budget should force preemption"
    expected = _reference(path, prompts)
    for o, exp in zip(outs, expected):
        assert o.outputs[0].token_ids == exp
        assert o.outputs[0].finish_reason == "length"
    assert stats.num_kv_blocks_used == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_8bit_kv_cache_decodes_greedily_under_transformers(tiny_models, arch, cpu_kernels):
    """kv_cache_dtype="int8" (codes + a scale per token and KV head) through chunked prefill,
    preemption and prefix-cache reuse: every token the engine picks is transformers' greedy
    choice on the same context up to 0.05 nats (the codes' error may split a near tie), and
    at least half the sequences match transformers' own greedy generation exactly."""
    import transformers

    path = tiny_models[arch]
    cfg = transformers.AutoConfig.from_pretrained(path)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # int8: layers * KV heads * 2 (K, V) * (head_dim codes + a 4-byte scale) a token; 40 blocks of 4
    token_bytes = cfg.num_hidden_layers * cfg.num_key_value_heads * 2 * (head_dim + 4)
    llm = LLM(path, dtype="float32", block_size=4, max_num_batched_tokens=24, max_num_seqs=6,
              kv_cache_memory=40 * 4 * token_bytes, max_model_len=80, kv_cache_dtype="int8")
    runner = llm.engine.core.executor
    assert runner.kv_caches[0].dtype == torch.int8 and runner.num_blocks == 40
    prompts = _prompts(llm.engine.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts + prompts[:2], params)  # the repeats hit the prefix cache
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    for p, o in zip(prompts + prompts[:2], outs):
        toks = o.outputs[0].token_ids
        with torch.inference_mode():
            lp = ref(torch.tensor([p + toks])).logits[0].float().log_softmax(-1)
        rows = lp[len(p) - 1: len(p) - 1 + len(toks)]
        gaps = rows.max(-1).values - rows[torch.arange(len(toks)), torch.tensor(toks)]
        assert float(gaps.max()) < 0.05
    exact = sum(o.outputs[0].token_ids == e for o, e in zip(outs, _reference(path, prompts)))
    assert exact >= len(prompts) // 2  # measured: 5 of 8 (llama)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cpu_steps_padded_to_recurring_sizes_match_transformers(tiny_models, arch, monkeypatch, cpu_kernels):
    """CPU steps of more than 64 tokens run at bucketed row counts (oneDNN builds a GEMM per
    row count): the padding rows write K/V only to the scratch block and change no output."""
    from scalellm.worker import model_runner

    assert [model_runner.padded_rows(n) for n in (1, 64, 65, 96, 97, 512, 513, 4000)] == \
        [1, 64, 96, 96, 128, 512, 576, 4032]
    pads = []
    real_tensors = model_runner.ModelRunner._tensors

    def tensors(self, st):
        pad = st.num_pad_tokens
        pads.append((len(st.input_ids), pad, set(st.slot_mapping[len(st.input_ids) - pad:])))
        return real_tensors(self, st)

    monkeypatch.setattr(model_runner.ModelRunner, "_tensors", tensors)
    path = tiny_models[arch]
    llm = LLM(path, dtype="float32", block_size=4, max_num_batched_tokens=200, max_num_seqs=8)
    runner = llm.engine.core.executor
    prompts = _prompts(llm.engine.vocab_size)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert any(pad for _, pad, _ in pads) and all(n == model_runner.padded_rows(n - pad) for n, pad, _ in pads)
    scratch = set(range(runner.scratch_block * 4, runner.scratch_block * 4 + 4))
    assert all(slots <= scratch for _, pad, slots in pads if pad)  # K/V of padding rows: the scratch block only
    for o, exp in zip(outs, _reference(path, prompts)):
        assert o.outputs[0].token_ids == exp


def test_logprobs_match_transformers(tiny_models):
    import transformers

    path = tiny_models["llama"]
    llm = LLM(path, dtype="float32", block_size=4)
    prompt = _prompts(llm.engine.vocab_size)[3]
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3))[0].outputs[0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    seq = torch.tensor([prompt + out.token_ids])
    with torch.inference_mode():
        lp = ref(seq).logits[0].float().log_softmax(-1)
    assert out.logprobs is not None and len(out.logprobs) == 5
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = lp[len(prompt) - 1 + i]
        assert abs(entry[tok] - float(row[tok])) < 1e-4
        top = row.topk(3)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[t] - v) < 1e-4
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))


def test_prefix_cache_reuse_gives_same_tokens(tiny_models):
    path = tiny_models["qwen2"]
    llm = LLM(path, dtype="float32", block_size=4, max_num_batched_tokens=64)
    base = _prompts(llm.engine.vocab_size)[6]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    first = llm.generate(base, params)[0]
    again = llm.generate(base, params)[0]
    assert again.metrics.num_cached_tokens >= 28
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.engine.stats().prefix_cache_hits > 0
    nocache = LLM(path, dtype="float32", block_size=4, enable_prefix_caching=False)
    assert nocache.generate(base, params)[0].outputs[0].token_ids == first.outputs[0].token_ids


def test_bf16_on_cpu_without_bf16_units_keeps_bf16_numerics(tiny_models, monkeypatch, cpu_kernels):
    """On a CPU without bf16 units, bf16 GEMMs run in float32 on the bf16 values: the
    log-probabilities match torch's own bf16 GEMMs (oneDNN, the MLP's activation in the GEMM
    epilogue) and transformers' bf16 model to within bf16's rounding noise. The two paths
    sum in different orders, so greedy decoding may part at a near tie, never elsewhere."""
    import transformers

    from scalellm.layers.linear import LinearBase
    from scalellm.worker import worker

    path = tiny_models["llama"]
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 200, (n,), generator=g).tolist() for n in (5, 17, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
    runs = {}
    for fast in (False, True):
        monkeypatch.setattr(worker, "cpu_has_fast_bf16", lambda fast=fast: fast)
        llm = LLM(path, dtype="bfloat16", block_size=4)
        linears = [m for m in llm.engine.core.executor.model.modules() if isinstance(m, LinearBase)]
        assert linears and all((m.weight32 is None) == fast for m in linears)
        runs[fast] = llm.generate(prompts, params)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    compared = 0
    for p, emulated, native in zip(prompts, runs[False], runs[True]):
        toks, native_toks = emulated.outputs[0].token_ids, native.outputs[0].token_ids
        with torch.inference_mode():
            lp = ref(torch.tensor([p + toks])).logits[0].float().log_softmax(-1)
        for i, (t, e) in enumerate(zip(toks, emulated.outputs[0].logprobs)):
            assert abs(e[t] - float(lp[len(p) - 1 + i][t])) < 0.05
        for i, (t, e, n) in enumerate(zip(toks, emulated.outputs[0].logprobs, native.outputs[0].logprobs)):
            if native_toks[i] != t:  # a near tie under both paths; the contexts differ from here on
                other = native_toks[i]
                assert other in e and e[t] - e[other] < 0.02 and t in n and n[other] - n[t] < 0.02
                break
            assert abs(e[t] - n[t]) < 0.02
            compared += 1
    assert compared >= 16
