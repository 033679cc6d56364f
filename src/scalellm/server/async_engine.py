"""The server's engine: tokenization and detokenization in the asyncio frontend, the
engine core in its own process. One `generate()` async iterator per request.

A caller that stops iterating (client disconnect, deadline) aborts the request in
the core at once; its KV blocks are free after the core's next loop turn.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

from scalellm.engine.builder import ModelInfo
from scalellm.engine.config import EngineConfig
from scalellm.engine.input_processor import InputProcessor
from scalellm.engine.output_processor import OutputProcessor
from scalellm.protocol import ipc
from scalellm.protocol.errors import InvalidParameterError, ScaleLLMError
from scalellm.protocol.outputs import RequestOutput
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.server.core_client import CoreClient, EngineDeadError

logger = logging.getLogger(__name__)


class QueueFullError(ScaleLLMError):
    """Too many requests waiting; the caller should retry later."""


class RequestAbortedError(ScaleLLMError):
    """The request was aborted by an explicit Abort call."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, info: ModelInfo, max_pending: int = 4096,
                 log_level: str = "WARNING", client: CoreClient | None = None) -> None:
        self.config = config
        self.info = info
        self.tokenizer = info.require_tokenizer()
        self.inputs = InputProcessor(self.tokenizer, info.max_model_len, info.vocab_size)
        self.outputs = OutputProcessor(self.tokenizer, info.eos_token_ids)
        self.max_pending = max_pending
        if client is None:
            client = CoreClient(config, log_level=log_level)
        client.bind(self._on_outputs, self._on_death)
        self.client = client
        self._queues: dict[str, asyncio.Queue] = {}
        self._counter = itertools.count()

    async def start(self) -> None:
        await self.client.start()

    async def shutdown(self) -> None:
        await self.client.shutdown()

    @property
    def is_ready(self) -> bool:
        return self.client.is_alive

    @property
    def load(self) -> ipc.EngineLoad:
        return self.client.load

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    def new_request_id(self) -> str:
        return f"req-{next(self._counter)}"

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0,
                       add_special_tokens: bool = True) -> AsyncIterator[RequestOutput]:
        if not self.client.is_alive:
            raise EngineDeadError(self.client.dead_reason or "engine is not running")
        if len(self._queues) >= self.max_pending:
            raise QueueFullError(f"{len(self._queues)} requests in flight (max {self.max_pending})")
        if request_id in self._queues:
            raise InvalidParameterError("request_id", f"{request_id!r} is already in use")
        processed = self.inputs.process(prompt, params, add_special_tokens)
        return self._stream(request_id, processed, params, priority)

    async def _stream(self, request_id, processed, params, priority) -> AsyncIterator[RequestOutput]:  # type: ignore[no-untyped-def]
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        first = self.outputs.add_request(request_id, processed.prompt, processed.prompt_token_ids, params,
                                         processed.max_output_tokens, priority)
        finished = False
        try:
            await self.client.add([first])
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await self._abort(request_id)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.client.abort(self.outputs.abort_request(request_id))
        except Exception:  # noqa: BLE001 - the core may be gone; nothing left to free
            logger.debug("abort of %s failed", request_id, exc_info=True)

    async def abort(self, request_id: str) -> None:
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(RequestAbortedError(f"request {request_id} was aborted"))
        await self._abort(request_id)

    def _on_outputs(self, msg: ipc.CoreOutputs) -> None:
        processed = self.outputs.process_outputs(msg.outputs)
        for out in processed.outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
        if processed.abort_core_ids or processed.start:
            asyncio.get_running_loop().create_task(self._follow_up(processed.abort_core_ids, processed.start))

    async def _follow_up(self, aborts: list[str], starts: list) -> None:
        try:
            if aborts:
                await self.client.abort(aborts)
            if starts:
                await self.client.add(starts)
        except EngineDeadError:
            pass

    def _on_death(self, reason: str) -> None:
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError(reason))
