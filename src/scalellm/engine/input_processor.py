"""Validates and tokenizes a prompt into what the engine core accepts.

Shared by the in-process engine and the server frontend. Knows the tokenizer and
the context length; knows nothing of scheduling or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from scalellm.protocol.errors import ContextLengthError, InvalidParameterError
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.tokenizer import Tokenizer


@dataclass(slots=True)
class ProcessedPrompt:
    prompt: str | None  # the text, when the prompt was text
    prompt_token_ids: list[int]
    max_output_tokens: int  # max_tokens, or what is left of the context


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidParameterError("prompt", f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
            return None, list(prompt)
        raise InvalidParameterError("prompt", "must be a string or a list of token ids")

    def process(self, prompt: str | list[int], params: SamplingParams, add_special_tokens: bool = True) -> ProcessedPrompt:
        text, ids = self.tokenize(prompt, add_special_tokens)
        if not ids:
            raise InvalidParameterError("prompt", "must contain at least one token")
        return ProcessedPrompt(text, ids, self.max_output_tokens(len(ids), params))

    def max_output_tokens(self, prompt_len: int, params: SamplingParams) -> int:
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
