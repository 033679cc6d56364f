"""The offline API on a tiny model: options, n > 1, seeds, stop strings, aborts, errors."""

from __future__ import annotations

import pytest

from scalellm import LLM, SamplingParams
from scalellm.protocol.errors import ContextLengthError, InvalidParameterError, KVCacheTooSmallError, ModelLoadError


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], dtype="float32", block_size=4, max_num_batched_tokens=32, max_model_len=128)


def test_seed_reproducible_across_batch_mixes(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate("Once upon a time", p)[0].outputs[0].token_ids
    mixed = llm.generate(
        ["The quick brown fox", "Once upon a time", "def f(x):", "Once upon a time there"],
        [SamplingParams(temperature=0.8, max_tokens=7, ignore_eos=True), p,
         SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), SamplingParams(seed=1, max_tokens=9)],
    )
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate("Once upon a time", SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=10,
                                                                 ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_greater_than_one_shares_prefix_blocks(llm):
    prompt = "Once upon a time there was a small model that liked numbers " * 2
    before = llm.engine.stats().prefix_cache_hits
    out = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # distinct seeded streams
    hits = llm.engine.stats().prefix_cache_hits - before
    full_blocks = (len(out.prompt_token_ids) - 1) // 4 * 4
    assert hits >= 3 * full_blocks  # children 1..3 reuse child 0's prompt blocks


def test_stop_strings_cut_text(llm):
    base = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    text = base.outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    inc = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=20, stop=[stop],
                                                             include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == text[: text.index(stop) + len(stop)]
    assert llm.engine.stats().num_kv_blocks_used == 0


def test_stop_token_ids_and_max_tokens(llm):
    base = llm.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    tid = base.token_ids[4]
    out = llm.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[tid]))[0].outputs[0]
    first = base.token_ids.index(tid)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tid


def test_abort_frees_blocks(llm):
    eng = llm.engine
    rid = eng.add_request(None, "Once upon a time " * 5, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.stats().num_kv_blocks_used > 0
    eng.abort_request(rid)
    assert eng.stats().num_kv_blocks_used == 0
    assert not eng.has_unfinished_requests()
    eng.step()  # the worker drops the request's state
    assert rid not in eng.core.executor.states


def test_chat_template_applied(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3))[0]
    expected = llm.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert out.prompt_token_ids == expected


def test_context_length_errors_give_both_numbers(llm):
    with pytest.raises(ContextLengthError) as e:
        llm.generate([1] * 100, SamplingParams(max_tokens=50))
    assert "100" in str(e.value) and "50" in str(e.value) and "128" in str(e.value)
    with pytest.raises(ContextLengthError):
        llm.generate([1] * 128, SamplingParams(max_tokens=1))
    with pytest.raises(InvalidParameterError, match="prompt"):
        llm.generate([10**9], SamplingParams())
    with pytest.raises(InvalidParameterError, match="prompt"):
        llm.generate("", SamplingParams())
    # max_tokens=None runs to the context length
    out = llm.generate([1] * 120, SamplingParams(max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_engine_options_are_validated(tiny_models):
    with pytest.raises(InvalidParameterError, match="unknown option"):
        LLM(tiny_models["llama"], max_batch=3)
    with pytest.raises(InvalidParameterError, match="dtype"):
        LLM(tiny_models["llama"], dtype="int3")
    with pytest.raises(KVCacheTooSmallError, match="max_model_len"):
        LLM(tiny_models["llama"], kv_cache_memory=4096, max_model_len=512)
    with pytest.raises(ModelLoadError, match="not found"):
        LLM("/nonexistent/model")
    with pytest.raises(InvalidParameterError, match="block_size"):
        LLM(tiny_models["llama"], block_size=3)
    with pytest.raises(InvalidParameterError, match="kv_cache_resident"):
        LLM(tiny_models["llama"], kv_cache_resident=-1)


def test_priority_is_served_first(llm):
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    # one slot at a time: the scheduler admits high priority before an earlier low one
    small = LLM(llm.config.model, dtype="float32", max_num_seqs=1, block_size=4)
    e = small.engine
    e.add_request("low", [3, 4, 5], params, priority=5)
    e.add_request("high", [3, 4, 6], params, priority=-1)
    order = []
    while e.has_unfinished_requests():
        order += [o.request_id for o in e.step() if o.finished]
    assert order == ["high", "low"]


def test_min_tokens_masks_the_eos_ids_each_request_brings(tiny_models):
    # The worker takes the EOS ids from each request (the engine-core process has no
    # tokenizer): make the greedy first token an EOS id of the requests; then a request
    # stops on it at once, and with min_tokens=1 it may not sample it first.
    llm = LLM(tiny_models["llama"], dtype="float32", block_size=4, max_num_batched_tokens=32, max_model_len=128)
    base = llm.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    eos = base.token_ids[0]
    llm.engine.outputs.eos_token_ids = frozenset({eos})
    stopped = llm.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert stopped.token_ids == [eos] and stopped.finish_reason == "stop"
    held = llm.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3, min_tokens=1))[0].outputs[0]
    assert held.token_ids[0] != eos
