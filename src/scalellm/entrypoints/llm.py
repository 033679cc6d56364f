"""The offline API: `LLM(...).generate(prompts, params)` and `.chat(messages, params)`.

Runs the same engine as the server, in-process, with no sockets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from scalellm.engine.config import EngineConfig
from scalellm.engine.llm_engine import LLMEngine
from scalellm.protocol.errors import InvalidParameterError
from scalellm.protocol.outputs import RequestOutput
from scalellm.protocol.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """An engine with a model loaded. `model=None` loads the embedded SmolLM2-135M-Instruct.

    Keyword arguments are EngineConfig fields: dtype, device, max_model_len,
    max_num_batched_tokens, max_num_seqs, block_size, kv_cache_memory, kv_cache_resident, kv_cache_dtype,
    enable_prefix_caching, seed, tensor_parallel_size, enable_expert_parallel.

    With tensor_parallel_size=N, ranks 1..N-1 are worker processes: call `shutdown()`
    (or leave the interpreter) to stop them; one such engine per process.
    """

    def __init__(self, model: str | None = None, **kwargs: object) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidParameterError(unknown[0], f"unknown option; known: {', '.join(sorted(known - {'model'}))}")
        self.config = EngineConfig(model=model, **kwargs)  # type: ignore[arg-type]
        self.engine = LLMEngine.from_config(self.config)
        self.tokenizer = self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the engine's worker processes, if any (tensor parallelism)."""
        self.engine.shutdown()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run all prompts to completion as one continuously batched workload.
        Outputs come back in the order of the prompts."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise InvalidParameterError("sampling_params", f"got {len(params)} for {len(prompts)} prompts")
        prios = list(priority) if priority is not None else [0] * len(prompts)
        ids = [self.engine.add_request(None, p, sp, prio) for p, sp, prio in zip(prompts, params, prios)]
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template (with the generation prompt) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts: list[Prompt] = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, add_generation_prompt=True)  # type: ignore[arg-type]
            # NOTE: the template already carries any BOS token; don't add another.
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc="generate", unit="req")
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in pending:
                self.engine.abort_request(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[r] for r in request_ids]
