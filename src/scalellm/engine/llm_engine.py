"""The in-process engine: tokenizer + engine core + detokenizers.

This is the offline path (`LLM`) and the reference for the server frontend: it
validates and tokenizes prompts, fans `n > 1` out into child requests that share
the prompt's KV blocks through the prefix cache, turns token outputs into text
with stop strings, and assembles RequestOutputs.

    add_request ──► validate, tokenize ──► EngineCore.add_request (child 0)
    step()      ──► EngineCore.step ──► detokenize, stop strings ──► RequestOutput
                    (children 1..n-1 join once child 0's prompt is in the cache)
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

from scalellm.engine.config import EngineConfig, SchedulerConfig
from scalellm.engine.core import EngineCore, EngineStats
from scalellm.engine.kv_cache_manager import KVCacheManager
from scalellm.engine.request import Request
from scalellm.engine.scheduler import Scheduler
from scalellm.protocol.errors import ContextLengthError, InvalidParameterError
from scalellm.protocol.outputs import CompletionOutput, FinishReason, RequestMetrics, RequestOutput
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.protocol.step import EngineCoreOutput
from scalellm.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


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


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, core: EngineCore, max_model_len: int,
                 vocab_size: int, eos_token_ids: frozenset[int], model_name: str) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.core = core
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.model_name = model_name
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, tuple[_Parent, _Child]] = {}
        self._counter = itertools.count()

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        from scalellm.loader.model_source import resolve_model
        from scalellm.models.args import parse_model_args
        from scalellm.worker.worker import build_model_runner, num_kv_blocks, resolve_device, resolve_dtype

        source = resolve_model(config.model)
        args = parse_model_args(source.read_config())
        tokenizer = load_tokenizer(source.path)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        max_model_len = config.max_model_len or args.max_position_embeddings
        if max_model_len > args.max_position_embeddings:
            raise InvalidParameterError(
                "max_model_len", f"{max_model_len} exceeds the model's {args.max_position_embeddings} positions"
            )
        if args.sliding_window and max_model_len > args.sliding_window:
            logger.warning("capping max_model_len to the sliding window %d", args.sliding_window)
            max_model_len = args.sliding_window
        num_blocks = num_kv_blocks(args, dtype, config.block_size, config.kv_cache_memory, max_model_len)
        eos = frozenset(tokenizer.eos_token_ids) | frozenset(args.eos_token_ids)
        runner = build_model_runner(
            source, args, dtype=dtype, device=device, block_size=config.block_size, num_blocks=num_blocks,
            eos_token_ids=eos, seed=config.seed,
        )
        sched_cfg = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, max_model_len)
        kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        core = EngineCore(Scheduler(sched_cfg, kv), runner)
        logger.info("engine ready: %s, dtype %s, %d KV blocks of %d tokens, max_model_len %d",
                    source.name, dtype, num_blocks, config.block_size, max_model_len)
        return cls(config, tokenizer, core, max_model_len, args.vocab_size, eos, source.name)

    # -- requests -------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidParameterError("prompt", f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
            return None, list(prompt)
        raise InvalidParameterError("prompt", "must be a string or a list of token ids")

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None) -> str:
        request_id = request_id if request_id is not None else f"req-{next(self._counter)}"
        if request_id in self._parents:
            raise InvalidParameterError("request_id", f"{request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise InvalidParameterError("prompt", "must contain at least one token")
        max_output = self._max_output_tokens(len(ids), params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        children = []
        for i in range(params.n):
            core_id = request_id if params.n == 1 else f"{request_id}#{i}"
            detok = IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            children.append(_Child(i, core_id, detok, logprobs=[] if params.logprobs is not None else None))
        parent = _Parent(request_id, text, ids, params, priority, max_output, children, RequestMetrics(arrival))
        self._parents[request_id] = parent
        for child in children:
            self._child_to_parent[child.core_id] = (parent, child)
        self._start_child(parent, children[0])
        return request_id

    def _max_output_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ContextLengthError(
                "prompt", f"the prompt has {prompt_len} tokens but the context length is {self.max_model_len}"
            )
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise ContextLengthError(
                "max_tokens",
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) = "
                f"{prompt_len + params.max_tokens} exceeds the context length of {self.max_model_len} tokens",
            )
        return params.max_tokens

    def _start_child(self, parent: _Parent, child: _Child) -> None:
        child.started = True
        req = Request(
            request_id=child.core_id,
            prompt_token_ids=parent.prompt_token_ids,
            sampling_params=parent.params,
            eos_token_ids=self.eos_token_ids,
            max_output_tokens=parent.max_output_tokens,
            priority=parent.priority,
            arrival_time=parent.metrics.arrival_time,
        )
        self.core.add_request(req, seed_offset=child.index)

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        self.core.abort_requests([c.core_id for c in parent.children if c.started])
        for child in parent.children:
            self._child_to_parent.pop(child.core_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    def stats(self) -> EngineStats:
        return self.core.stats()

    # -- the loop --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        touched: dict[str, _Parent] = {}
        for out in self.core.step():
            entry = self._child_to_parent.get(out.request_id)
            if entry is None:
                continue  # aborted by the caller meanwhile
            parent, child = entry
            self._apply(parent, child, out)
            touched[parent.request_id] = parent
        results = []
        for parent in touched.values():
            # n > 1: the other children start once child 0 has its prompt in the KV cache
            if parent.children[0].token_ids and not all(c.started for c in parent.children):
                for child in parent.children[1:]:
                    if not child.started:
                        self._start_child(parent, child)
            results.append(self._make_output(parent))
            if parent.finished:
                del self._parents[parent.request_id]
                for child in parent.children:
                    self._child_to_parent.pop(child.core_id, None)
        return results

    def _apply(self, parent: _Parent, child: _Child, out: EngineCoreOutput) -> None:
        m = parent.metrics
        if out.first_token_time is not None and m.first_token_time is None:
            m.first_token_time = out.first_token_time
            m.first_scheduled_time = out.first_scheduled_time
            m.num_cached_tokens = out.num_cached_tokens
        m.num_preemptions = max(m.num_preemptions, out.num_preemptions)
        child.token_ids.extend(out.new_token_ids)
        if out.new_logprobs and child.logprobs is not None:
            for lp in out.new_logprobs:
                entry = dict(zip(lp.top_token_ids, lp.top_logprobs))
                entry[out.new_token_ids[0]] = lp.sampled_logprob
                child.logprobs.append(entry)
                child.cumulative_logprob += lp.sampled_logprob
        stop_str = child.detok.update(out.new_token_ids)
        if stop_str is not None:
            child.finish_reason = FinishReason.STOP
            child.stop_reason = stop_str
            if out.finish_reason is None:
                self.core.abort_requests([child.core_id])
        elif out.finish_reason is not None:
            child.finish_reason = FinishReason(out.finish_reason)
            child.stop_reason = out.stop_reason
        child.delta_text += child.detok.take_delta()
        if child.finish_reason is not None:
            child.delta_text += child.detok.finish()
            if parent.finished:
                m.finished_time = time.monotonic()

    def _make_output(self, parent: _Parent) -> RequestOutput:
        outs = []
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
        extra = {"delta_text": [c.delta_text for c in parent.children]}
        for child in parent.children:
            child.delta_text = ""
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outs,
            finished=parent.finished,
            metrics=parent.metrics,
            extra=extra,
        )
