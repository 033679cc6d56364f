"""Resuming a request elsewhere (what the gateway does when a replica dies mid-stream):
prompt + the tokens produced so far, with `resume_tokens`/`resume_chars`, must continue
exactly as the uninterrupted request — seeded sampling, penalties and text alike."""

from __future__ import annotations

import pytest

from scalellm import LLM, SamplingParams
from scalellm.protocol.errors import InvalidParameterError
from scalellm.tokenizer.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], dtype="float32", block_size=4, max_num_batched_tokens=32, max_model_len=256)


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=11),
                                dict(temperature=0.8, seed=3, frequency_penalty=1.0, presence_penalty=0.5,
                                     repetition_penalty=1.3)])
def test_resumed_request_continues_exactly(llm, kw):
    prompt = "Once upon a time"
    full = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True, **kw))[0]
    ids, text = full.outputs[0].token_ids, full.outputs[0].text
    cut = 9
    # what a client would have seen after `cut` tokens: the stream's text so far
    detok = IncrementalDetokenizer(llm.engine.tokenizer)
    seen = ""
    for t in ids[:cut]:
        detok.update([t])
        seen += detok.take_delta()
    params = SamplingParams(max_tokens=24 - cut, ignore_eos=True, resume_tokens=cut, resume_chars=len(seen), **kw)
    rid = llm.engine.add_request(None, full.prompt_token_ids + ids[:cut], params, 0)
    deltas, last = [], None
    while last is None:
        for out in llm.engine.step():
            if out.request_id == rid:
                deltas.append(out.extra["deltas"][0]["text"])
                last = out if out.finished else None
    assert last.outputs[0].token_ids == ids[cut:]
    assert seen + "".join(deltas) == text  # the client's stream, byte for byte


def test_detokenizer_resume_recovers_split_character():
    class Bytes:
        """A byte-level toy tokenizer: token i is byte i."""

        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    word = "naïve ☃ ok".encode()
    full = IncrementalDetokenizer(Bytes())
    deltas = []
    for b in word:
        full.update([b])
        deltas.append(full.take_delta())
    deltas.append(full.finish())
    assert "".join(deltas) == "naïve ☃ ok"
    for cut in range(1, len(word)):
        seen = "".join(deltas[:cut])  # what the client had when the first replica died
        d = IncrementalDetokenizer(Bytes())
        d.resume(list(word[:cut]), len(seen))
        rest = []
        for b in word[cut:]:
            d.update([b])
            rest.append(d.take_delta())
        rest.append(d.finish())
        assert seen + "".join(rest) == "naïve ☃ ok", cut


def test_resume_tokens_validated(llm):
    with pytest.raises(InvalidParameterError):
        llm.generate([1, 2], SamplingParams(max_tokens=2, resume_tokens=5))
    with pytest.raises(InvalidParameterError):
        SamplingParams(resume_tokens=-1)
