"""GenerateCall <-> gRPC messages, for the gateway side of the Replica service."""

from __future__ import annotations

from scalellm.protocol.generation import ChoiceDelta, GenerateCall, GenerateChunk, TokenLogprob
from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.sampling_params import SamplingParams


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    out = pb.SamplingParams(
        n=p.n, temperature=p.temperature, top_p=p.top_p, min_p=p.min_p, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty, min_tokens=p.min_tokens,
        stop=p.stop, stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos,
        include_stop_str_in_output=p.include_stop_str_in_output, skip_special_tokens=p.skip_special_tokens,
    )
    if p.top_k > 0:
        out.top_k = p.top_k
    if p.seed is not None:
        out.seed = p.seed
    if p.max_tokens is not None:
        out.max_tokens = p.max_tokens
    if p.logprobs is not None:
        out.logprobs = p.logprobs
    return out


def call_to_proto(call: GenerateCall, deadline_unix: float = 0.0) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=call.request_id, model=call.model, params=sampling_to_proto(call.params),
                             priority=call.priority, add_generation_prompt=call.add_generation_prompt,
                             include_prompt_text=True, include_prompt_token_ids=call.params.n == 1,
                             deadline_unix=deadline_unix, trace_id=call.trace_id,
                             resume_tokens=call.params.resume_tokens, resume_chars=call.params.resume_chars)
    if call.messages is not None:
        req.messages.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"])
                                                        for m in call.messages]))
    elif isinstance(call.prompt, str):
        req.prompt = call.prompt
    else:
        req.prompt_token_ids.CopyFrom(pb.TokenIds(ids=list(call.prompt or [])))
    return req


def chunk_from_proto(resp: pb.GenerateResponse) -> GenerateChunk:
    choices = []
    for c in resp.choices:
        which = c.WhichOneof("stop_reason")
        stop_reason = c.stop_str if which == "stop_str" else (c.stop_token_id if which == "stop_token_id" else None)
        lps = [TokenLogprob(lp.token_id, lp.token, lp.logprob, [(t.token_id, t.token, t.logprob) for t in lp.top])
               for lp in c.logprobs] if c.logprobs else None
        choices.append(ChoiceDelta(c.index, c.text, list(c.token_ids), lps, c.finish_reason or None, stop_reason))
    timings = {}
    if resp.finished:
        t = resp.timings
        timings = {k: v for k, v in (("queue", t.queue), ("ttft", t.ttft), ("tpot", t.tpot), ("e2e", t.e2e)) if v}
        s = resp.timestamps
        timings.update((k, v) for k, v in (
            ("received_unix", s.received), ("queued_unix", s.queued), ("first_scheduled_unix", s.first_scheduled),
            ("first_token_unix", s.first_token), ("finished_unix", s.finished)) if v)
    return GenerateChunk(choices, resp.prompt_text if resp.HasField("prompt_text") else None, resp.prompt_tokens,
                         resp.completion_tokens, resp.finished, timings,
                         list(resp.prompt_token_ids) if resp.prompt_token_ids else None)
