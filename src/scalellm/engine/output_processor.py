"""Frontend request state: n-way fan-out, detokenization, stop strings, outputs.

Turns the engine core's token outputs into RequestOutputs. Shared by the
in-process engine (LLMEngine) and the server frontend (over IPC). It never calls
the core itself: it returns what to start and what to abort, and the caller acts.

    child 0 starts at once; children 1..n-1 start once child 0 has its first token,
    so they hit the prefix cache for every full block of the shared prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from scalellm.protocol.errors import InvalidParameterError
from scalellm.protocol.outputs import CompletionOutput, FinishReason, RequestMetrics, RequestOutput
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.protocol.step import CoreRequest, EngineCoreOutput
from scalellm.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(slots=True)
class _Child:
    index: int
    core_id: str
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    started: bool = False
    delta_text: str = ""  # text produced since the last RequestOutput (for streaming)
    num_sent_tokens: int = 0  # token ids already reported in a delta


@dataclass(slots=True)
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    max_output_tokens: int
    children: list[_Child]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


@dataclass(slots=True)
class ProcessedOutputs:
    outputs: list[RequestOutput]
    abort_core_ids: list[str]  # children stopped by a stop string: abort them in the core
    start: list[CoreRequest]  # children to add to the core now


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, tuple[_Parent, _Child]] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._parents

    def __len__(self) -> int:
        return len(self._parents)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    max_output_tokens: int, priority: int = 0, arrival_time: float | None = None) -> CoreRequest:
        """Register a request; returns the core request of child 0 (start it now)."""
        if params.resume_tokens > len(prompt_token_ids):
            raise InvalidParameterError("resume_tokens", f"must be <= the prompt length ({len(prompt_token_ids)})")
        children = []
        for i in range(params.n):
            core_id = request_id if params.n == 1 else f"{request_id}#{i}"
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            if params.resume_tokens:
                detok.resume(prompt_token_ids[len(prompt_token_ids) - params.resume_tokens:], params.resume_chars)
            children.append(_Child(i, core_id, detok, logprobs=[] if params.logprobs is not None else None))
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        parent = _Parent(request_id, prompt, prompt_token_ids, params, priority, max_output_tokens, children,
                         RequestMetrics(arrival))
        self._parents[request_id] = parent
        for child in children:
            self._children[child.core_id] = (parent, child)
        return self._start(parent, children[0])

    def _start(self, parent: _Parent, child: _Child) -> CoreRequest:
        child.started = True
        return CoreRequest(
            request_id=child.core_id,
            prompt_token_ids=parent.prompt_token_ids,
            sampling_params=parent.params,
            eos_token_ids=sorted(self.eos_token_ids),
            max_output_tokens=parent.max_output_tokens,
            priority=parent.priority,
            arrival_time=parent.metrics.arrival_time,
            seed_offset=child.index,
        )

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns the core ids to abort."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        for child in parent.children:
            self._children.pop(child.core_id, None)
        return [c.core_id for c in parent.children if c.started and c.finish_reason is None]

    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        touched: dict[str, _Parent] = {}
        aborts: list[str] = []
        for out in core_outputs:
            entry = self._children.get(out.request_id)
            if entry is None:
                continue  # aborted by the caller meanwhile
            parent, child = entry
            if self._apply(parent, child, out):
                aborts.append(child.core_id)
            touched[parent.request_id] = parent
        results, start = [], []
        for parent in touched.values():
            if parent.children[0].token_ids:
                start += [self._start(parent, c) for c in parent.children[1:] if not c.started]
            results.append(self._make_output(parent))
            if parent.finished:
                del self._parents[parent.request_id]
                for child in parent.children:
                    self._children.pop(child.core_id, None)
        return ProcessedOutputs(results, aborts, start)

    def _apply(self, parent: _Parent, child: _Child, out: EngineCoreOutput) -> bool:
        """Fold one core output into the child; True when the core must abort it."""
        m = parent.metrics
        if out.first_token_time is not None and m.first_token_time is None:
            m.first_token_time = out.first_token_time
            m.first_scheduled_time = out.first_scheduled_time
            m.num_cached_tokens = out.num_cached_tokens
        m.num_preemptions = max(m.num_preemptions, out.num_preemptions)
        child.token_ids.extend(out.new_token_ids)
        if out.new_logprobs and child.logprobs is not None:
            for tok, lp in zip(out.new_token_ids, out.new_logprobs):
                entry = dict(zip(lp.top_token_ids, lp.top_logprobs))
                entry[tok] = lp.sampled_logprob
                child.logprobs.append(entry)
                child.cumulative_logprob += lp.sampled_logprob
        stop_str = child.detok.update(out.new_token_ids)
        must_abort = False
        if stop_str is not None:
            child.finish_reason = FinishReason.STOP
            child.stop_reason = stop_str
            must_abort = out.finish_reason is None
        elif out.finish_reason is not None:
            child.finish_reason = FinishReason(out.finish_reason)
            child.stop_reason = out.stop_reason
        child.delta_text += child.detok.take_delta()
        if child.finish_reason is not None:
            child.delta_text += child.detok.finish()
            if parent.finished:
                m.finished_time = time.monotonic()
        return must_abort

    def _make_output(self, parent: _Parent) -> RequestOutput:
        outs = []
        deltas = []
        for child in parent.children:
            outs.append(CompletionOutput(
                index=child.index,
                text=child.detok.output_text,
                token_ids=list(child.token_ids),
                finish_reason=child.finish_reason,
                stop_reason=child.stop_reason,
                logprobs=list(child.logprobs) if child.logprobs is not None else None,
                cumulative_logprob=child.cumulative_logprob if child.logprobs is not None else None,
            ))
            deltas.append({"text": child.delta_text, "token_ids": child.token_ids[child.num_sent_tokens:],
                           "logprobs": child.logprobs[child.num_sent_tokens:] if child.logprobs is not None else None})
            child.delta_text = ""
            child.num_sent_tokens = len(child.token_ids)
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outs,
            finished=parent.finished,
            metrics=parent.metrics,
            extra={"deltas": deltas},
        )
