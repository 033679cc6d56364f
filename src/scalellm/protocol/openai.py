"""OpenAI-compatible request types (msgspec), decoded strictly: unknown fields and
wrong types are errors that name the field. A leaf module: no engine, no torch.

Fields we accept but do not implement are absent, so sending them is a 400 that
names them (never silently ignored).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from scalellm.protocol.errors import InvalidParameterError
from scalellm.protocol.sampling_params import SamplingParams


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    # vLLM's extension (guidellm always sends it): with include_usage, every chunk
    # carries the usage so far, not only the final one.
    continuous_usage_stats: bool = False


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]


class _Common(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    deadline_ms: int | None = None  # relative deadline; the x-deadline-ms header does the same

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise InvalidParameterError("stream_options", "is only allowed when stream is true")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k in (None, 0) else self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[str | int | list[int]]  # msgspec allows one array type per union
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def sampling_params(self) -> SamplingParams:
        return self._sampling(self.max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidParameterError("prompt", "must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[list-item]
        if all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
            return list(p)  # type: ignore[arg-type]
        raise InvalidParameterError("prompt", "must be a string, a list of strings, a list of token ids "
                                              "or a list of lists of token ids (not a mix)")


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True

    def sampling_params(self) -> SamplingParams:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidParameterError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParameterError("top_logprobs", "requires logprobs to be true")
        if not self.messages:
            raise InvalidParameterError("messages", "must contain at least one message")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens, lp)


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str | None = None
    tokens: list[int]


def decode_request(data: bytes, kind: type[msgspec.Struct]) -> msgspec.Struct:
    """Strict decode; errors become InvalidParameterError naming the field."""
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as e:
        field, message = _describe(str(e))
        raise InvalidParameterError(field, message) from None
    except msgspec.DecodeError as e:
        raise InvalidParameterError("body", f"malformed JSON: {e}") from None


def _describe(message: str) -> tuple[str, str]:
    """msgspec's message -> (field path, message). Examples:
    "Object contains unknown field `foo`" (+ " - at `$.messages[0]`"),
    "Expected `int`, got `str` - at `$.max_tokens`", "Object missing required field `model`"."""
    where = ""
    if " - at `$" in message:
        message, where = message.rsplit(" - at `$", 1)
        where = where.rstrip("`").lstrip(".")
    if "unknown field `" in message:
        name = message.split("unknown field `", 1)[1].split("`", 1)[0]
        path = f"{where}.{name}" if where else name
        return path, f"unrecognized request argument supplied: {path} (not supported)"
    if "missing required field `" in message:
        name = message.split("missing required field `", 1)[1].split("`", 1)[0]
        path = f"{where}.{name}" if where else name
        return path, f"{path} is required"
    return where or "body", f"{where or 'body'}: {message}"
