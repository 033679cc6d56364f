"""Token counting for the bench: the served model's tokenizer through the server's
`/tokenize` when it has one, else a local tokenizer (scalellm.tokenizer: a .gguf file
or a Hugging Face model directory; no torch).

Used off the hot path only: to fit synthetic prompts before a run, and after a run
to count output tokens of responses that carried no usage.

What this module does NOT know: the load model, statistics, wire formats of chunks.
"""

from __future__ import annotations

from scalellm.bench.endpoint import Endpoint
from scalellm.bench.records import RequestRecord


class ServerCounter:
    """Counts with the endpoint's POST /tokenize."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.source = f"server:{endpoint.config.base_url}/tokenize"

    async def count(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                    add_special_tokens: bool = True) -> int:
        ids = await self.endpoint.tokenize(prompt, messages, add_special_tokens)
        if ids is None:
            raise RuntimeError("the server's /tokenize went away")
        return len(ids)


class LocalCounter:
    """Counts with a local tokenizer file or directory."""

    def __init__(self, path: str) -> None:
        from scalellm.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(path)
        self.source = f"local:{path}"

    async def count(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                    add_special_tokens: bool = True) -> int:
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return len(self.tokenizer.encode(prompt or "", add_special_tokens=add_special_tokens))


async def pick_counter(endpoint: Endpoint, tokenizer_path: str | None) -> ServerCounter | LocalCounter | None:
    """The served model's tokenizer (the server's /tokenize) if it answers, else the local
    tokenizer when one is given, else None."""
    try:
        if await endpoint.tokenize(prompt="hello") is not None:
            return ServerCounter(endpoint)
    except RuntimeError:
        pass
    return LocalCounter(tokenizer_path) if tokenizer_path else None


async def fill_output_tokens(records: list[RequestRecord], counter: ServerCounter | LocalCounter | None) -> None:
    """Output token counts for records without usage: the tokenizer's, else chunks."""
    for rec in records:
        if rec.output_token_source:
            continue
        if counter is not None and rec.text:
            rec.output_tokens = await counter.count(prompt=rec.text, add_special_tokens=False)
            rec.output_token_source = "tokenizer"
        else:
            rec.output_tokens = len(rec.chunk_times) if rec.chunk_times else (1 if rec.text else 0)
            rec.output_token_source = "chunks"
