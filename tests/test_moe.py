"""Mixture-of-experts: the fused expert layer against a naive per-token reference, its
tensor/expert-parallel weight shards, and tiny random-weight Mixtral / Qwen3-MoE models
against transformers (logits, and greedy tokens through the engine with chunked prefill)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from scalellm import LLM, SamplingParams
from scalellm.distributed.parallel_state import ParallelState, get_parallel_state, set_parallel_state
from scalellm.layers.attention import fresh_prompt_batch
from scalellm.layers.moe import FusedMoE, fused_experts, select_experts
from scalellm.loader.model_source import resolve_model
from scalellm.models.args import parse_model_args
from scalellm.models.registry import get_model_class
from scalellm.protocol.errors import ModelLoadError

MODELS = ["mixtral", "qwen3_moe", "qwen3_moe_norm"]

# ---------------------------------------------------------------------------- the layer


def _naive_moe(x, gate_w, w1, w3, w2, top_k: int, renormalize: bool) -> torch.Tensor:
    """One token at a time, one expert at a time: the definition, no batching tricks."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ gate_w.T, dim=-1)
        weights, ids = probs.topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights.tolist(), ids.tolist()):
            out[t] += w * (w2[e] @ (F.silu(w1[e] @ x[t]) * (w3[e] @ x[t])))
    return out


def _random_experts(num_experts: int, hidden: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate_w = torch.randn(num_experts, hidden, generator=g) * 0.3
    w1 = torch.randn(num_experts, inter, hidden, generator=g) * 0.1
    w3 = torch.randn(num_experts, inter, hidden, generator=g) * 0.1
    w2 = torch.randn(num_experts, hidden, inter, generator=g) * 0.1
    return gate_w, w1, w3, w2


def _load_layer(layer: FusedMoE, gate_w, w1, w3, w2, stacked: bool) -> None:
    layer.gate.weight.weight_loader(layer.gate.weight, gate_w)
    if stacked:  # transformers' in-memory layout: [E, 2I, M] and [E, M, I]
        layer.weight_loader(layer.w13_weight, torch.cat([w1, w3], dim=1), "w13")
        layer.weight_loader(layer.w2_weight, w2, "w2")
        return
    for e in range(w1.shape[0]):  # the Hub layout: one 2-D matrix per expert
        layer.weight_loader(layer.w13_weight, w1[e], "w1", e)
        layer.weight_loader(layer.w13_weight, w3[e], "w3", e)
        layer.weight_loader(layer.w2_weight, w2[e], "w2", e)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("stacked", [True, False])
def test_fused_moe_matches_naive_per_token(renormalize, stacked):
    num_experts, top_k, hidden, inter, tokens = 8, 2, 32, 24, 37
    weights = _random_experts(num_experts, hidden, inter)
    layer = FusedMoE(hidden, inter, num_experts, top_k, renormalize, torch.float32)
    _load_layer(layer, *weights, stacked=stacked)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = layer(x)
        counts = layer.read_expert_load()
    torch.testing.assert_close(got, _naive_moe(x, *weights, top_k, renormalize), atol=1e-5, rtol=1e-5)
    _, ids = select_experts(x @ weights[0].T, top_k, renormalize)
    assert counts == torch.bincount(ids.flatten(), minlength=num_experts).tolist()
    assert sum(counts) == tokens * top_k
    assert layer.read_expert_load() == [0] * num_experts  # read resets


def test_fused_moe_single_token_and_unused_experts():
    num_experts, hidden, inter = 16, 16, 8
    weights = _random_experts(num_experts, hidden, inter, seed=3)
    layer = FusedMoE(hidden, inter, num_experts, 4, True, torch.float32, track_expert_load=False)
    _load_layer(layer, *weights, stacked=False)
    x = torch.randn(1, hidden)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), _naive_moe(x, *weights, 4, True), atol=1e-5, rtol=1e-5)
    assert layer.read_expert_load() == []


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_parallel_shards_sum_to_the_full_layer(expert_parallel):
    """Each rank's partial output (before the all-reduce) from its slice of the same
    checkpoint tensors; their sum is the single-rank result."""
    num_experts, top_k, hidden, inter, tokens, ranks = 8, 2, 32, 24, 19, 2
    weights = _random_experts(num_experts, hidden, inter, seed=5)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2))
    full = FusedMoE(hidden, inter, num_experts, top_k, True, torch.float32)
    _load_layer(full, *weights, stacked=True)
    with torch.inference_mode():
        expected = full(x)
    topk_w, topk_ids = select_experts(x @ weights[0].T, top_k, True)
    saved = get_parallel_state()
    partial = torch.zeros_like(x)
    try:
        for rank in range(ranks):
            set_parallel_state(ParallelState(tp_rank=rank, tp_size=ranks))
            layer = FusedMoE(hidden, inter, num_experts, top_k, True, torch.float32, expert_parallel=expert_parallel)
            _load_layer(layer, *weights, stacked=rank == 0)  # both layouts shard the same way
            if expert_parallel:
                assert layer.w13_weight.shape == (num_experts // ranks, 2 * inter, hidden)
            else:
                assert layer.w13_weight.shape == (num_experts, 2 * inter // ranks, hidden)
            out, counts = fused_experts(x, layer.w13_weight, layer.w2_weight, topk_w, topk_ids,
                                        num_experts, layer.expert_start)
            assert int(counts.sum()) == tokens * top_k  # every rank counts every expert
            partial += out
    finally:
        set_parallel_state(saved)
    torch.testing.assert_close(partial, expected, atol=1e-5, rtol=1e-5)


def test_expert_weight_shape_errors_are_clear():
    layer = FusedMoE(16, 8, 4, 2, True, torch.float32)
    with pytest.raises(ModelLoadError, match="expert 1 w1.*shape \\(9, 16\\).*expected \\(8, 16\\)"):
        layer.weight_loader(layer.w13_weight, torch.zeros(9, 16), "w1", 1)
    with pytest.raises(ModelLoadError, match="expected 4 experts"):
        layer.weight_loader(layer.w2_weight, torch.zeros(3, 16, 8), "w2")
    with pytest.raises(ModelLoadError, match="out of range"):
        layer.weight_loader(layer.w2_weight, torch.zeros(16, 8), "w2", 4)


# ---------------------------------------------------------------------------- the models


def _our_model(path: str):
    src = resolve_model(path)
    args = parse_model_args(src.read_config())
    model = get_model_class(args.architecture)(args, torch.float32)
    model.load_weights(src.iter_weights())
    return model, args


def _prefill_logits(model, args, ids: list[int]) -> torch.Tensor:
    t = len(ids)
    batch = fresh_prompt_batch(t, args.num_layers, args.num_kv_heads, args.head_dim, block_size=4)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(t), batch))

def _reference_logits(path: str, ids: list[int]) -> torch.Tensor:
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return ref(torch.tensor([ids])).logits[0].float()


def test_moe_args_follow_each_config(tiny_moe_models):
    mixtral = parse_model_args(resolve_model(tiny_moe_models["mixtral"]).read_config())
    assert mixtral.moe is not None and mixtral.moe.renormalize and mixtral.moe.dense_layer_ids == frozenset()
    assert (mixtral.moe.num_experts, mixtral.moe.top_k, mixtral.moe.intermediate_size) == (4, 2, 128)
    qwen = parse_model_args(resolve_model(tiny_moe_models["qwen3_moe"]).read_config())
    assert qwen.qk_norm and qwen.moe is not None and not qwen.moe.renormalize
    assert qwen.moe.dense_layer_ids == frozenset({1}) and qwen.moe.intermediate_size == 32
    norm = parse_model_args(resolve_model(tiny_moe_models["qwen3_moe_norm"]).read_config())
    assert norm.moe is not None and norm.moe.renormalize and norm.moe.dense_layer_ids == frozenset({0, 2})


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(tiny_moe_models, name):
    path = tiny_moe_models[name]
    ours, args = _our_model(path)
    ids = torch.randint(0, args.vocab_size, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    got = _prefill_logits(ours, args, ids)
    torch.testing.assert_close(got, _reference_logits(path, ids), atol=1e-4, rtol=1e-4)
    load = ours.read_expert_load()
    assert set(load) == set(range(args.num_layers)) - args.moe.dense_layer_ids
    assert all(sum(c) == len(ids) * args.moe.top_k for c in load.values())


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_stacked_expert_checkpoint_layout(tmp_path, tiny_moe_models, name):
    """A raw transformers-5 state_dict (experts.gate_up_proj [E, 2I, M], experts.down_proj
    [E, M, I]) saved as safetensors loads to the same model as the per-expert files."""
    import transformers
    from safetensors.torch import save_file

    src = tiny_moe_models[name]
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") and v.dim() == 3 for k, v in state.items())
    out = tmp_path / "stacked"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), out / f)
    ours, args = _our_model(str(out))
    ids = list(range(5, 30))
    torch.testing.assert_close(_prefill_logits(ours, args, ids), _reference_logits(src, ids), atol=1e-4, rtol=1e-4)


def test_missing_expert_is_named(tmp_path, tiny_moe_models):
    from safetensors.torch import load_file, save_file

    src = tiny_moe_models["mixtral"]
    out = tmp_path / "missing"
    shutil.copytree(src, out)
    state = load_file(str(out / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing 1 tensors.*layers\.1\.mlp\.w13_weight#w3@2"):
        _our_model(str(out))
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    cfg["num_local_experts"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="expert id 3 is out of range"):
        _our_model(str(out))


PROMPT_LENS = [3, 9, 17, 26, 41, 55]
NEW_TOKENS = 10


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_batched_greedy_equals_transformers(tiny_moe_models, name):
    import transformers

    path = tiny_moe_models[name]
    # max_num_batched_tokens=16 < the longer prompts: chunked prefill mixed with decodes.
    llm = LLM(path, dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=6, max_model_len=80)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, llm.engine.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    model = llm.engine.core.executor.model
    model.read_expert_load()  # start counting from zero
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert llm.engine.stats().num_preemptions == 0  # so every token was run exactly once
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    with torch.inference_mode():
        for p, o in zip(prompts, outs):
            seq = ref.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            assert o.outputs[0].token_ids == seq[0, len(p):].tolist()
    # every prompt token and every fed-back output token (all but the last) went through each MoE layer
    num_tokens = sum(PROMPT_LENS) + len(prompts) * (NEW_TOKENS - 1)
    load = model.read_expert_load()
    assert load and all(sum(c) == num_tokens * model.args.moe.top_k for c in load.values())


# ---------------------------------------------------------------------------- GGUF

_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.gate": "ffn_gate_inp",
}
_GGUF_EXPERTS = {"w1": "ffn_gate", "gate_proj": "ffn_gate", "w3": "ffn_up", "up_proj": "ffn_up",
                 "w2": "ffn_down", "down_proj": "ffn_down"}


def _write_moe_gguf(hf_dir: str, out: str, arch: str, qtype, stacked: bool = True) -> str:
    """What llama.cpp's converter writes for an HF MoE checkpoint: expert stacks [E, rows,
    cols] as `ffn_*_exps` (stacked=False: the older per-expert `ffn_*.{e}`), the router as
    `ffn_gate_inp`, Mixtral (arch llama) Q/K permuted."""
    import re

    import gguf
    import numpy as np
    from gguf.quants import quantize
    from safetensors.torch import load_file

    cfg = json.loads(open(os.path.join(hf_dir, "config.json"), encoding="utf-8").read())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    num_experts = cfg.get("num_experts") or cfg["num_local_experts"]
    tensors: dict[str, np.ndarray] = {}
    stacks: dict[str, list[np.ndarray | None]] = {}
    for name, w in load_file(os.path.join(hf_dir, "model.safetensors")).items():
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            tensors[{"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]] = w.numpy()
            continue
        if m := re.match(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$", name):
            stack = stacks.setdefault(f"blk.{m.group(1)}.{_GGUF_EXPERTS[m.group(3)]}_exps.weight", [None] * num_experts)
            stack[int(m.group(2))] = w.numpy()
            continue
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            n = heads if module == "self_attn.q_proj" else kv_heads
            w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        tensors[f"blk.{layer}.{_GGUF_LAYER[module]}.{kind}"] = w.numpy()
    for name, ws in stacks.items():
        if stacked:
            tensors[name] = np.stack(ws)  # type: ignore[arg-type]
        else:
            tensors |= {name.replace("_exps.", f".{e}."): w for e, w in enumerate(ws)}  # type: ignore[misc]
    writer = gguf.GGUFWriter(out, arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_expert_count(num_experts)
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch == "qwen3moe":
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    writer.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    writer.add_eos_token_id(0)
    for name, w in tensors.items():
        q = gguf.GGMLQuantizationType.F32 if w.ndim == 1 or "ffn_gate_inp" in name else qtype
        writer.add_tensor(name, w if q == gguf.GGMLQuantizationType.F32 else quantize(w, q), raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("name,arch", [("mixtral", "llama"), ("qwen3_moe_all", "qwen3moe")])
def test_gguf_moe_logits_match_transformers(tmp_path, tiny_moe_models, name, arch):
    """F32 GGUF files written the way llama.cpp lays out MoE models load to the same logits."""
    from gguf import GGMLQuantizationType as Q

    from conftest import build_tiny_model

    if name == "qwen3_moe_all":  # llama.cpp's qwen3moe: every layer MoE, top-k renormalised
        hf_dir = build_tiny_model(str(tmp_path / "hf"), "qwen3_moe", norm_topk_prob=True)
    else:
        hf_dir = tiny_moe_models[name]
    path = _write_moe_gguf(hf_dir, str(tmp_path / "m.gguf"), arch, Q.F32)
    ours, args = _our_model(path)
    assert args.architecture == json.loads(open(os.path.join(hf_dir, "config.json"), encoding="utf-8").read())["architectures"][0]
    assert args.moe is not None and args.moe.renormalize and not args.moe.dense_layer_ids
    ids = list(range(5, 36))
    torch.testing.assert_close(_prefill_logits(ours, args, ids), _reference_logits(hf_dir, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stacked", [True, False])
def test_gguf_moe_quantized_experts_split_per_expert(tmp_path, tiny_moe_models, stacked):
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file

    from scalellm.loader.gguf_loader import iter_gguf_weights

    hf_dir = tiny_moe_models["mixtral"]
    path = _write_moe_gguf(hf_dir, str(tmp_path / "q.gguf"), "llama", Q.Q8_0, stacked)
    ours = dict(iter_gguf_weights(path))
    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    assert set(ours) == set(hf)
    w = hf["model.layers.1.block_sparse_moe.experts.3.w2.weight"].numpy()
    want = np.asarray(dequantize(quantize(w, Q.Q8_0), Q.Q8_0), np.float32).reshape(w.shape)
    assert torch.equal(ours["model.layers.1.block_sparse_moe.experts.3.w2.weight"], torch.from_numpy(want))
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert torch.equal(ours[router], hf[router])  # routers stay float32
