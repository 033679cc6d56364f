"""Many Generate calls over one gRPC stream (the Replica service's GenerateMux), both ends.

With one server-streaming Generate call per request, every token of every request is
its own HTTP/2 message, and grpc.aio's Python per message (~85 us to read one at the
gateway, measured at c=64) is most of what the gateway and the replica's frontend
spend. Those two processes share the machine with the engine: each millisecond they
take stalls the engine's threads for about two or three (benchmarks/README.md).

GenerateMux carries every call between a gateway and a replica on one bidirectional
stream: requests and cancels go one way, and the other way each message holds what the
calls produced in the same moment (one engine step gives one token to each running
request). The per-call semantics are Generate's exactly: the server side runs the
service's own Generate for each call with a per-call context whose `abort` fails only
that call, and the client side raises `grpc.aio.AioRpcError` with the call's status,
so retry and resume logic written for Generate works unchanged.

    server:  async def GenerateMux(self, requests, context):
                 await serve_mux(self.Generate, requests, context)
    client:  mux = MuxClient(stub)
             async for resp in mux.generate(request, traceparent): ...

A replica without GenerateMux answers UNIMPLEMENTED: `MuxClient.generate` then raises
`MuxUnsupported` before anything was sent for the call, and the caller uses Generate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from scalellm.protocol.grpc import replica_pb2 as pb

logger = logging.getLogger(__name__)

# A MuxResponse holds at most this many bytes of items (one larger item goes alone): a step's
# first responses echo prompts, and a burst of long ones must not exceed what the caller
# accepts in one message (the gateway: 64 MiB) and fail every call on the stream.
MAX_MESSAGE_BYTES = 4 << 20

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


# ---------------------------------------------------------------------------------------
# server side


class _CallAborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _CallContext:
    """What a Generate implementation uses of its ServicerContext, for one call of a
    mux stream: `abort` fails this call only."""

    def __init__(self, traceparent: str) -> None:
        self._metadata = (("traceparent", traceparent),) if traceparent else ()
        self._code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = None) -> None:
        self._code = code
        raise _CallAborted(code, details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def cancelled(self) -> bool:
        return False


GenerateFn = Callable[[pb.GenerateRequest, Any], AsyncIterator[pb.GenerateResponse]]


async def serve_mux(generate: GenerateFn, requests: AsyncIterator[pb.MuxRequest],
                    context: grpc.aio.ServicerContext) -> None:
    """Serve one GenerateMux stream: each `generate` request runs `generate(request,
    per-call context)` as its own task; everything the calls produce is written in
    batches (whatever is ready when the writer runs: after one engine step, every
    running call's token). Ends when the caller has closed its side and every call is
    over; if the stream itself goes (the caller died), every call is cancelled, which
    aborts its request as a cancelled Generate does."""
    outbox: list[pb.MuxItem] = []
    wake = asyncio.Event()
    calls: dict[int, asyncio.Task] = {}

    async def run_call(stream_id: int, request: pb.GenerateRequest, traceparent: str) -> None:
        ctx = _CallContext(traceparent)
        try:
            async for resp in generate(request, ctx):
                outbox.append(pb.MuxItem(stream_id=stream_id, response=resp))
                wake.set()
            outbox.append(pb.MuxItem(stream_id=stream_id, done=True))
        except _CallAborted as e:
            outbox.append(pb.MuxItem(stream_id=stream_id, code=e.code.value[0], details=e.details))
        except asyncio.CancelledError:
            raise  # the caller cancelled it: nothing to send
        except Exception as e:  # a bug in the call: fail it, not the stream
            logger.exception("mux call %d failed", stream_id)
            outbox.append(pb.MuxItem(stream_id=stream_id, code=grpc.StatusCode.UNKNOWN.value[0],
                                     details=f"{type(e).__name__}: {e}"))
        finally:
            calls.pop(stream_id, None)
            wake.set()

    async def read() -> None:
        try:
            async for req in requests:
                if req.WhichOneof("kind") == "generate":
                    calls[req.stream_id] = asyncio.create_task(run_call(req.stream_id, req.generate, req.traceparent))
                else:
                    task = calls.get(req.stream_id)
                    if task is not None:
                        task.cancel()
        finally:
            wake.set()

    # the caller waits for this before its first write (see _Stream.write)
    await context.send_initial_metadata(())
    reader = asyncio.create_task(read())
    try:
        while True:
            await wake.wait()
            wake.clear()
            # NOTE: one turn of the event loop first: the frontend wakes every call's task
            # from one engine-step message, so the rest of that step's tokens join this batch.
            await asyncio.sleep(0)
            if outbox:
                items = outbox[:]
                outbox.clear()
                for batch in _batches(items, MAX_MESSAGE_BYTES):
                    await context.write(pb.MuxResponse(items=batch))
            if reader.done() and not calls and not outbox:
                reader.result()  # re-raise a failed read
                return
    finally:
        reader.cancel()
        for task in list(calls.values()):
            task.cancel()


def _batches(items: list[pb.MuxItem], max_bytes: int) -> list[list[pb.MuxItem]]:
    """Consecutive runs of items of at most max_bytes serialized (an item over it alone)."""
    out: list[list[pb.MuxItem]] = [[]]
    size = 0
    for item in items:
        n = item.ByteSize() + 8  # + the field's tag and length
        if out[-1] and size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


# ---------------------------------------------------------------------------------------
# client side


class MuxUnsupported(Exception):
    """The replica does not implement GenerateMux (nothing was sent for the call)."""


class _Stream:
    """One GenerateMux call (a bidirectional stream) and the Generate calls on it."""

    def __init__(self, stub: Any) -> None:
        self.call = stub.GenerateMux()
        self.queues: dict[int, asyncio.Queue] = {}
        self.next_id = 1
        self.closed: grpc.aio.AioRpcError | None = None
        self._write_lock = asyncio.Lock()
        self._accepted = False
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        error = _rpc_error(grpc.StatusCode.UNAVAILABLE, "replica closed the GenerateMux stream")
        try:
            while True:
                resp = await self.call.read()
                if resp is grpc.aio.EOF:
                    break
                for item in resp.items:
                    q = self.queues.get(item.stream_id)
                    if q is not None:
                        q.put_nowait(item)
        except grpc.aio.AioRpcError as e:
            error = e
        except asyncio.CancelledError:
            error = _rpc_error(grpc.StatusCode.CANCELLED, "GenerateMux stream closed by the gateway")
            raise
        finally:
            self.closed = error
            for q in self.queues.values():
                q.put_nowait(error)

    async def write(self, req: pb.MuxRequest) -> None:
        # NOTE: grpc.aio allows one write in flight per call
        async with self._write_lock:
            if not self._accepted:
                # NOTE: the replica's first word (its initial metadata) before our first write:
                # a replica without GenerateMux ends the call at once (UNIMPLEMENTED), and a write
                # racing that end made the call report INTERNAL instead
                await self.call.initial_metadata()
                self._accepted = True
            if self.call.done():
                return  # refused or gone: the reader reports the call's status
            await self.call.write(req)

    def close(self) -> None:
        self.reader.cancel()
        self.call.cancel()


class MuxClient:
    """The gateway's end: Generate calls to one replica over one GenerateMux stream,
    opened on first use and again after it breaks (a broken stream fails the calls that
    were on it with its status, e.g. UNAVAILABLE when the replica died)."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self.supported: bool | None = None  # unknown until the replica answered once
        self._stream: _Stream | None = None

    def _open(self) -> _Stream:
        s = self._stream
        if s is None or s.closed is not None:
            s = self._stream = _Stream(self.stub)
        return s

    async def generate(self, request: pb.GenerateRequest, traceparent: str = "") -> AsyncIterator[pb.GenerateResponse]:
        """Generate's responses for `request`; raises grpc.aio.AioRpcError as Generate would,
        or MuxUnsupported before any response. Closing the iterator early cancels the call
        on the replica."""
        s = self._open()
        stream_id = s.next_id
        s.next_id += 1
        q: asyncio.Queue = asyncio.Queue()
        s.queues[stream_id] = q
        ended = False
        try:
            try:
                await s.write(pb.MuxRequest(stream_id=stream_id, generate=request, traceparent=traceparent))
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                pass  # the stream broke: its reader puts the error on the queue
            while True:
                item = await q.get()  # a MuxItem, or the stream's error (its reader puts one on every queue)
                if isinstance(item, grpc.aio.AioRpcError):
                    ended = True
                    if item.code() == grpc.StatusCode.UNIMPLEMENTED and not self.supported:
                        self.supported = False
                        raise MuxUnsupported(item.details() or "")
                    raise item
                self.supported = True
                if item.code:
                    ended = True
                    raise _rpc_error(_CODES.get(item.code, grpc.StatusCode.UNKNOWN), item.details)
                if item.done:
                    ended = True
                    return
                yield item.response
        finally:
            s.queues.pop(stream_id, None)
            if not ended and s.closed is None:
                # the caller left before the call ended: cancel it on the replica (off this
                # path: a finally of an async generator may run where awaiting is not allowed)
                task = asyncio.get_running_loop().create_task(self._cancel(s, stream_id))
                task.add_done_callback(_ignore_result)

    @staticmethod
    async def _cancel(s: _Stream, stream_id: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            await s.write(pb.MuxRequest(stream_id=stream_id, cancel=True))

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _ignore_result(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
