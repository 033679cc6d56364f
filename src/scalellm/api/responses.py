"""Building OpenAI response bodies and stream chunks from GenerateChunks."""

from __future__ import annotations

import time

from scalellm.protocol.generation import ChoiceDelta, GenerateChunk, TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(lps: list[TokenLogprob], text_offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_offset
    for lp in lps:
        tokens.append(lp.token)
        token_lps.append(lp.logprob)
        tops.append({t: v for _, t, v in lp.top} if lp.top else None)
        offsets.append(pos)
        pos += len(lp.token)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [
        {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]} for lp in lps
    ]}


class Accumulator:
    """Collects a whole (non-streamed) result per choice."""

    def __init__(self, num_choices: int) -> None:
        self.text = [""] * num_choices
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(num_choices)]
        self.finish: list[str | None] = [None] * num_choices
        self.stop_reason: list[str | int | None] = [None] * num_choices
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.prompt_text: str | None = None
        self.timings: dict[str, float] = {}

    def add(self, chunk: GenerateChunk, base: int = 0) -> None:
        for c in chunk.choices:
            i = base + c.index
            self.text[i] += c.text
            if c.logprobs:
                self.logprobs[i].extend(c.logprobs)
            if c.finish_reason:
                self.finish[i] = c.finish_reason
                self.stop_reason[i] = c.stop_reason
        self.prompt_text = chunk.prompt_text


def created() -> int:
    return int(time.time())


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None,
                      stop_reason: str | int | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}


def chat_delta_choice(d: ChoiceDelta, index: int, first: bool, logprobs: dict | None) -> dict:
    delta: dict = {"role": "assistant", "content": d.text} if first else {"content": d.text}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": d.finish_reason}
