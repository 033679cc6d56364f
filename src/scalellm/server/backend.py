"""The replica's Backend for the OpenAI HTTP layer (and the gRPC service): turns
GenerateCalls into AsyncEngine requests and RequestOutput deltas into GenerateChunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from scalellm.protocol.generation import ChoiceDelta, GenerateCall, GenerateChunk, TokenLogprob
from scalellm.protocol.outputs import RequestOutput
from scalellm.server.async_engine import AsyncEngine


class EngineBackend:
    def __init__(self, engine: AsyncEngine, served_model_name: str) -> None:
        self.engine = engine
        self.model_names = [served_model_name]
        self.tokenizer = engine.tokenizer
        self._token_text: dict[int, str] = {}

    def is_ready(self) -> bool:
        return self.engine.is_ready

    def engine_gauges(self) -> dict[str, float]:
        ld = self.engine.load
        total = max(ld.num_kv_blocks_total, 1)
        return {
            "num_requests_running": ld.num_running,
            "num_requests_waiting": ld.num_waiting,
            "kv_cache_usage_ratio": ld.num_kv_blocks_used / total,
            "kv_cache_blocks_used": ld.num_kv_blocks_used,
            "kv_cache_blocks_total": ld.num_kv_blocks_total,
            "num_preemptions_total": ld.num_preemptions,
            "prefix_cache_queries_total": ld.prefix_cache_queries,
            "prefix_cache_hits_total": ld.prefix_cache_hits,
            "num_tokens_in_flight": ld.num_tokens_in_flight,
            "frontend_requests_in_flight": self.engine.num_requests,
        }

    def _prompt(self, call: GenerateCall) -> tuple[str | list[int], bool]:
        if call.messages is not None:
            text = self.tokenizer.apply_chat_template(call.messages, add_generation_prompt=call.add_generation_prompt)
            return self.tokenizer.encode(text, add_special_tokens=False), False
        assert call.prompt is not None
        return call.prompt, True

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerateChunk]:
        prompt, add_special = self._prompt(call)
        outputs = await self.engine.generate(call.request_id, prompt, call.params, call.priority, add_special)
        return self._chunks(call, outputs)

    async def _chunks(self, call: GenerateCall, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[GenerateChunk]:
        sent_prompt = False
        try:
            async for out in outputs:
                choices = []
                for c, d in zip(out.outputs, out.extra["deltas"]):
                    if not d["token_ids"] and not d["text"] and c.finish_reason is None:
                        continue
                    lps = None
                    if d["logprobs"] is not None:
                        n = call.params.logprobs or 0
                        lps = [self._logprob(tok, entry, n) for tok, entry in zip(d["token_ids"], d["logprobs"])]
                    choices.append(ChoiceDelta(c.index, d["text"], d["token_ids"], lps,
                                               str(c.finish_reason) if c.finish_reason else None, c.stop_reason))
                prompt_text = None
                if not sent_prompt:
                    prompt_text = out.prompt if out.prompt is not None else self.tokenizer.decode(out.prompt_token_ids)
                    sent_prompt = True
                yield GenerateChunk(choices, prompt_text, len(out.prompt_token_ids),
                                    sum(len(c.token_ids) for c in out.outputs), out.finished,
                                    _timings(out) if out.finished else {},
                                    list(out.prompt_token_ids) if prompt_text is not None else None)
        finally:
            await outputs.aclose()

    def _text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if "\ufffd" in t or not t:
                # NOTE: a lone byte of a multi-byte character decodes to U+FFFD; name it by its
                # vocabulary entry instead, so logprob keys stay distinct per token.
                t = self.tokenizer.convert_ids_to_tokens([token_id])[0] or f"<id:{token_id}>"
            self._token_text[token_id] = t
        return t

    def _logprob(self, token_id: int, entry: dict[int, float], n: int) -> TokenLogprob:
        # entry holds the top n plus the sampled token; a sampled token outside the top n
        # has the lowest value, so sorting and cutting at n gives exactly the top n.
        top = sorted(entry.items(), key=lambda x: -x[1])[:n]
        return TokenLogprob(token_id, self._text(token_id), entry[token_id],
                            [(tid, self._text(tid), lp) for tid, lp in top])

    async def tokenize(self, prompt: str | None, messages: list[dict] | None, add_special_tokens: bool) -> list[int]:
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt or "", add_special_tokens=add_special_tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)


def _timings(out: RequestOutput) -> dict[str, float]:
    """Durations (seconds since arrival) and unix timestamps (`*_unix`) of a finished request."""
    m = out.metrics
    if m is None:
        return {}
    to_unix = time.time() - time.monotonic()  # CLOCK_MONOTONIC is shared by the core process
    t: dict[str, float] = {}
    end = m.finished_time or time.monotonic()
    t["e2e"] = end - m.arrival_time
    t["queued_unix"] = m.arrival_time + to_unix
    t["finished_unix"] = end + to_unix
    if m.first_scheduled_time is not None:
        t["queue"] = m.first_scheduled_time - m.arrival_time
        t["first_scheduled_unix"] = m.first_scheduled_time + to_unix
    if m.first_token_time is not None:
        t["ttft"] = m.first_token_time - m.arrival_time
        t["first_token_unix"] = m.first_token_time + to_unix
        n = max(len(c.token_ids) for c in out.outputs)
        if n > 1:
            t["tpot"] = (end - m.first_token_time) / (n - 1)
    return t
