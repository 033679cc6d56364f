"""The replica's gRPC service (grpc.aio, same event loop as the HTTP frontend).

Errors map to gRPC status codes: INVALID_ARGUMENT (message names the field),
NOT_FOUND (model), RESOURCE_EXHAUSTED (queue full), UNAVAILABLE (engine down),
DEADLINE_EXCEEDED (deadline_unix passed). A cancelled Generate call aborts the
request in the engine.

With tracing on, each Generate call is a span, the child of the caller's W3C
`traceparent` (gRPC metadata), carrying the request's ids, tokens and timings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from scalellm.api.streams import until
from scalellm.api.tracing import Tracing
from scalellm.protocol.errors import InvalidParameterError
from scalellm.protocol.generation import GenerateCall, GenerateChunk
from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.grpc import replica_pb2_grpc as pb_grpc
from scalellm.protocol.grpc.mux import serve_mux
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.server.async_engine import QueueFullError, RequestAbortedError
from scalellm.server.backend import EngineBackend
from scalellm.server.core_client import EngineDeadError

LOAD_HEARTBEAT_S = 2.0  # StreamLoad: an unchanged load is re-sent this often


def sampling_from_proto(p: pb.SamplingParams, resume_tokens: int = 0, resume_chars: int = 0) -> SamplingParams:
    return SamplingParams(
        n=p.n or 1,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") and p.top_k > 0 else -1,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        min_tokens=p.min_tokens,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        include_stop_str_in_output=p.include_stop_str_in_output,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        skip_special_tokens=p.skip_special_tokens if p.HasField("skip_special_tokens") else True,
        resume_tokens=resume_tokens,
        resume_chars=resume_chars,
    )


def chunk_to_proto(chunk: GenerateChunk, include_prompt: bool, received_unix: float = 0.0,
                   include_prompt_ids: bool = False) -> pb.GenerateResponse:
    choices = []
    for c in chunk.choices:
        choice = pb.Choice(index=c.index, text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason or "")
        if isinstance(c.stop_reason, str):
            choice.stop_str = c.stop_reason
        elif isinstance(c.stop_reason, int):
            choice.stop_token_id = c.stop_reason
        for lp in c.logprobs or []:
            choice.logprobs.append(pb.TokenLogprob(
                token_id=lp.token_id, token=lp.token, logprob=lp.logprob,
                top=[pb.TopLogprob(token_id=i, token=t, logprob=v) for i, t, v in lp.top]))
        choices.append(choice)
    t = chunk.timings
    resp = pb.GenerateResponse(choices=choices, prompt_tokens=chunk.num_prompt_tokens,
                               completion_tokens=chunk.num_completion_tokens, finished=chunk.finished,
                               timings=pb.Timings(queue=t.get("queue", 0.0), ttft=t.get("ttft", 0.0),
                                                  tpot=t.get("tpot", 0.0), e2e=t.get("e2e", 0.0)))
    if include_prompt and chunk.prompt_text is not None:
        resp.prompt_text = chunk.prompt_text
    if include_prompt_ids and chunk.prompt_token_ids is not None:
        resp.prompt_token_ids.extend(chunk.prompt_token_ids)
    if chunk.finished:
        resp.timestamps.CopyFrom(pb.Timestamps(
            received=received_unix, queued=t.get("queued_unix", 0.0), first_scheduled=t.get("first_scheduled_unix", 0.0),
            first_token=t.get("first_token_unix", 0.0), finished=t.get("finished_unix", 0.0)))
    return resp


class ReplicaService(pb_grpc.ReplicaServicer):
    def __init__(self, backend: EngineBackend, max_model_len: int, tracing: Tracing | None = None) -> None:
        self.backend = backend
        self.engine = backend.engine
        self.max_model_len = max_model_len
        self.tracing = tracing
        if tracing is not None:
            # NOTE: chosen once here, so an untraced replica has no extra generator layer per chunk
            self.Generate = self._generate_traced  # type: ignore[method-assign]

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        received = time.time()
        if request.model and request.model not in self.backend.model_names:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} not found")
        which = request.WhichOneof("input")
        call = GenerateCall(
            request_id=request.request_id or self.engine.new_request_id(),
            model=request.model,
            params=SamplingParams(),
            priority=request.priority,
            add_generation_prompt=request.add_generation_prompt,
            trace_id=request.trace_id,
            arrival_unix=received,
        )
        try:
            call.params = sampling_from_proto(request.params, request.resume_tokens, request.resume_chars)
            if which == "prompt":
                call.prompt = request.prompt
            elif which == "prompt_token_ids":
                call.prompt = list(request.prompt_token_ids.ids)
            elif which == "messages":
                call.messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            else:
                raise InvalidParameterError("input", "give prompt, prompt_token_ids or messages")
            stream = await self.backend.generate(call)
        except InvalidParameterError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        # NOTE: the deadline guards only the waits for the engine, never a `yield` (see until_deadline)
        chunks = until(max(request.deadline_unix, 0.0), stream)
        try:
            async for chunk in chunks:
                yield chunk_to_proto(chunk, request.include_prompt_text, received, request.include_prompt_token_ids)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request deadline passed; aborted")
        except RequestAbortedError as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            await chunks.aclose()  # closes `stream` too

    async def _generate_traced(self, request: pb.GenerateRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        assert self.tracing is not None
        parent = next((v for k, v in context.invocation_metadata() or () if k == "traceparent"), None)
        span = self.tracing.start("scalellm.v1.Replica/Generate", time.time(), parent, {
            "rpc.system": "grpc", "rpc.service": "scalellm.v1.Replica", "rpc.method": "Generate",
            "scalellm.request_id": request.trace_id, "scalellm.completion_id": request.request_id,
            "gen_ai.request.model": request.model})
        code = grpc.StatusCode.OK
        last = None
        try:
            async for resp in ReplicaService.Generate(self, request, context):
                last = resp
                yield resp
        except (asyncio.CancelledError, GeneratorExit):  # the caller cancelled the call
            # NOTE: a caller may close the stream as soon as it has the finished chunk, before
            # the call ends here: the request completed, so that is OK (CI saw CANCELLED)
            code = grpc.StatusCode.OK if last is not None and last.finished else grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            aborted = context.code()  # what context.abort set
            code = aborted if isinstance(aborted, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            raise
        finally:
            if last is not None:
                span.usage(last.prompt_tokens, last.completion_tokens)
                if last.finished:
                    t = last.timings
                    span.latency({"queue": t.queue * 1e3, "ttft": t.ttft * 1e3, "e2e": t.e2e * 1e3})
            span.set("rpc.grpc.status_code", code.value[0])
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                span.fail(code.name)
            span.end()

    async def GenerateMux(self, request_iterator: AsyncIterator[pb.MuxRequest],
                          context: grpc.aio.ServicerContext) -> None:
        """Many Generate calls on one stream, their responses batched per engine step
        (protocol/grpc/mux.py); each call is this service's Generate (traced if tracing is on)."""
        await serve_mux(self.Generate, request_iterator, context)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        found = request.request_id in self.engine.outputs
        await self.engine.abort(request.request_id)
        return pb.AbortResponse(found=found)

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(live=True, ready=self.engine.is_ready)

    def _load(self) -> pb.LoadResponse:
        ld = self.engine.load
        rate = ld.prefix_cache_hits / ld.prefix_cache_queries if ld.prefix_cache_queries else 0.0
        return pb.LoadResponse(num_running=ld.num_running, num_waiting=ld.num_waiting,
                               kv_blocks_used=ld.num_kv_blocks_used, kv_blocks_total=ld.num_kv_blocks_total,
                               tokens_in_flight=ld.num_tokens_in_flight, prefix_cache_hit_rate=rate,
                               frontend_requests=self.engine.num_requests, num_preemptions=ld.num_preemptions,
                               num_steps=ld.num_steps, prefix_cache_queries=ld.prefix_cache_queries)

    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadResponse:
        return self._load()

    async def StreamLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.LoadResponse]:
        """The load every `interval_ms` while it changes, else every LOAD_HEARTBEAT_S.

        NOTE: an idle replica sent an unchanged report 10 times a second, and the gateway
        and replica frontend each spent ~1% of a core on them (gRPC + asyncio), on a
        2-core machine shared with the engine."""
        interval = max(request.interval_ms or 100, 10) / 1000
        last: pb.LoadResponse | None = None
        sent_at = 0.0
        while True:
            load = self._load()
            now = time.monotonic()
            if load != last or now - sent_at >= LOAD_HEARTBEAT_S:
                yield load
                last, sent_at = load, now
            await asyncio.sleep(interval)

    async def Models(self, request: pb.ModelsRequest, context: grpc.aio.ServicerContext) -> pb.ModelsResponse:
        return pb.ModelsResponse(models=self.backend.model_names, max_model_len=self.max_model_len)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        which = request.WhichOneof("input")
        msgs = [{"role": m.role, "content": m.content} for m in request.messages.messages] if which == "messages" else None
        try:
            ids = await self.backend.tokenize(request.prompt if which == "prompt" else None, msgs,
                                              request.add_special_tokens)
        except InvalidParameterError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(tokens=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        try:
            text = await self.backend.detokenize(list(request.tokens))
        except (InvalidParameterError, ValueError, IndexError, OverflowError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"tokens: {e}")
        return pb.DetokenizeResponse(text=text)


async def start_grpc_server(service: ReplicaService, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_ReplicaServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    await server.start()
    return server
