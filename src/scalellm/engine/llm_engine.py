"""The in-process engine: input processor + engine core + output processor.

This is the offline path (`LLM`); the server runs the same processors with the
core in its own process.

    add_request ──► InputProcessor (validate, tokenize) ──► EngineCore.add_core_request (child 0)
    step()      ──► EngineCore.step ──► OutputProcessor (detokenize, stop strings, n fan-out) ──► RequestOutput
"""

from __future__ import annotations

import itertools
import time

from scalellm.engine.config import EngineConfig
from scalellm.engine.core import EngineCore, EngineStats
from scalellm.engine.input_processor import InputProcessor
from scalellm.engine.output_processor import OutputProcessor
from scalellm.protocol.errors import InvalidParameterError
from scalellm.protocol.outputs import RequestOutput
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.tokenizer import Tokenizer


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
        self.inputs = InputProcessor(tokenizer, max_model_len, vocab_size)
        self.outputs = OutputProcessor(tokenizer, eos_token_ids)
        self._counter = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        from scalellm.engine.builder import build_engine_core, resolve_model_info

        info = resolve_model_info(config)
        return cls(config, info.require_tokenizer(), build_engine_core(config, info), info.max_model_len,
                   info.vocab_size, info.eos_token_ids, info.model_name)

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None, add_special_tokens: bool = True) -> str:
        request_id = request_id if request_id is not None else f"req-{next(self._counter)}"
        if request_id in self.outputs:
            raise InvalidParameterError("request_id", f"{request_id!r} is already in use")
        p = self.inputs.process(prompt, params, add_special_tokens)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        first = self.outputs.add_request(request_id, p.prompt, p.prompt_token_ids, params, p.max_output_tokens,
                                         priority, arrival)
        self.core.add_core_request(first)
        return request_id

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.outputs.abort_request(request_id))

    def has_unfinished_requests(self) -> bool:
        return len(self.outputs) > 0

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.outputs)

    def stats(self) -> EngineStats:
        return self.core.stats()

    def shutdown(self) -> None:
        """Stop worker processes (tensor parallelism); the engine is unusable afterwards."""
        self.core.shutdown()

    def step(self) -> list[RequestOutput]:
        processed = self.outputs.process_outputs(self.core.step())
        if processed.abort_core_ids:
            self.core.abort_requests(processed.abort_core_ids)
        for req in processed.start:
            self.core.add_core_request(req)
        return processed.outputs
