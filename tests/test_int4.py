"""The int4 path (quant/int4.py, `quantization="int4"`): 4-bit copies of the bf16 linears for
calls of up to INT4_MAX_ROWS rows. Checked against the bf16 values they stand for: a weight
made of 4-bit groups (as a Q4_1 GGUF's are) comes back exactly, and an engine whose linears
hold such weights generates what the bf16 engine does, with its decode steps on the 4-bit
GEMM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalellm.layers import linear
from scalellm.quant.int4 import GROUP_SIZE, Int4Weight, int4_cpu_available
from scalellm.worker.worker import cpu_has_fast_bf16

pytestmark = pytest.mark.skipif(not int4_cpu_available(), reason="torch build lacks the CPU int4 GEMM")


def _four_bit_groups(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """[n, k] bf16 weights made of 4-bit groups of 32 along k: -1/4 + q/32 with q in 0..15, each
    group using codes 0 and 15 (as a GGUF Q4_1 block's minimum and maximum do); all exact in bf16."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP_SIZE, GROUP_SIZE), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    return (-0.25 + q.float() / 32).view(n, k).to(torch.bfloat16)


def test_four_bit_groups_come_back_exactly_and_multiply_as_their_values():
    w = _four_bit_groups(96, 128)
    q = Int4Weight(w)
    assert torch.equal(q.dequantize(), w.float())
    assert q.nbytes < w.numel() * 2 / 3  # codes (half a byte) + a bf16 scale and zero per 32
    x = torch.randn(3, 128).to(torch.bfloat16)
    ref = x.float() @ w.float().t()
    assert torch.allclose(q.mm(x).float(), ref, atol=2e-2 * ref.abs().max().item())


def test_any_weight_is_within_half_a_step_of_its_codes():
    torch.manual_seed(0)
    w = (torch.randn(64, 96) * 0.05).to(torch.bfloat16)
    deq = Int4Weight(w).dequantize()
    groups = w.float().view(64, -1, GROUP_SIZE)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # [64, 3]
    err = (deq - w.float()).abs().view(64, -1, GROUP_SIZE).amax(-1)
    assert (err <= step * 0.5 + step * 0.02 + 1e-6).all()  # rounding, and scale/zero held in bf16


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="int4 serves CPUs with bf16 units")
def test_a_linear_takes_the_four_bit_copy_only_for_small_calls():
    torch.manual_seed(0)
    lin = linear.ReplicatedLinear(128, 64, bias=True, dtype=torch.bfloat16)
    lin.weight.data.copy_(_four_bit_groups(64, 128))
    lin.bias.data.copy_(torch.randn(64))
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    assert lin.set_int4() > 0
    lin.set_packed()
    assert lin.int4 is not None and lin.packed is not None
    for rows in (1, linear.INT4_MAX_ROWS, linear.INT4_MAX_ROWS + 1, 64):
        x = torch.randn(rows, 128).to(torch.bfloat16)
        ref = F.linear(x.float(), w.float(), b.float())
        out = lin(x)
        assert out.shape == (rows, 64)
        assert torch.allclose(out.float(), ref, atol=2e-2 * ref.abs().max().item()), rows
        if rows <= linear.INT4_MAX_ROWS:  # the 4-bit GEMM's own result
            assert torch.equal(out, lin.int4.mm(x) + b), rows


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="int4 serves CPUs with bf16 units")
def test_engine_on_four_bit_weights_generates_what_bf16_does(tmp_path, monkeypatch):
    import transformers

    from conftest import build_tiny_model
    from scalellm import LLM, SamplingParams

    path = build_tiny_model(str(tmp_path / "llama"), "llama", tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for i, (name, p) in enumerate(hf.named_parameters()):
            if name.endswith("proj.weight"):  # q, k, v, o, gate, up, down
                p.copy_(_four_bit_groups(*p.shape, seed=i).float())
    hf.save_pretrained(path)

    calls = []
    mm = Int4Weight.mm
    monkeypatch.setattr(Int4Weight, "mm", lambda self, x: (calls.append(x.shape[0]), mm(self, x))[1])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompt = list(range(3, 120, 5))
    ref = LLM(path, dtype="bfloat16").generate([prompt], params)[0].outputs[0].token_ids
    assert not calls
    q_llm = LLM(path, dtype="bfloat16", quantization="int4")
    linears = [m for m in q_llm.engine.core.executor.model.modules() if isinstance(m, linear.LinearBase)]
    assert linears and all(m.int4 is not None for m in linears)
    out = q_llm.generate([prompt], params)[0].outputs[0].token_ids
    assert list(out) == list(ref)
    # the decode steps (one row each) ran on the 4-bit GEMM; the prompt's rows did not
    assert calls and set(calls) == {1}


def test_int4_needs_bf16_on_cpu():
    from scalellm import LLM
    from scalellm.protocol.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="quantization"):
        LLM(None, dtype="float32", quantization="int4")
