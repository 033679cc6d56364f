"""GenerateMux (protocol/grpc/mux.py): many Generate calls on one gRPC stream, over real
sockets, against a replica stand-in that steps its calls together the way the engine does."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from scalellm.gateway.replica_client import ReplicaClient
from scalellm.protocol.generation import GenerateCall
from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.grpc import replica_pb2_grpc as pb_grpc
from scalellm.protocol.grpc.mux import MuxClient, MuxUnsupported, serve_mux
from scalellm.protocol.sampling_params import SamplingParams
from standin import StandInServer
from test_server import _free_port


class Stepper(pb_grpc.ReplicaServicer):
    """Each Generate call yields one token per step; a ticker steps every running call at
    once (as one engine step does). prompt "fail" aborts with INVALID_ARGUMENT after one
    token; mux=False answers GenerateMux with UNIMPLEMENTED (an older replica)."""

    def __init__(self, mux: bool = True, step_s: float = 0.005) -> None:
        self.mux = mux
        self.step_s = step_s
        self.messages = 0  # MuxResponse messages written
        self.items = 0
        self.cancelled: list[str] = []
        self.generate_calls = 0
        self._step: asyncio.Event | None = None

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            step, self._step = self._step, asyncio.Event()
            if step is not None:
                step.set()

    async def _next_step(self) -> None:
        if self._step is None:
            self._step = asyncio.Event()
            asyncio.get_running_loop().create_task(self._ticker())
        await self._step.wait()

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        self.generate_calls += 1
        n = request.params.max_tokens
        done = False
        try:
            for i in range(n):
                await self._next_step()
                if request.prompt == "fail" and i == 1:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature: scripted")
                yield pb.GenerateResponse(choices=[pb.Choice(index=0, text=f" t{i}", token_ids=[i])],
                                          completion_tokens=i + 1, finished=i == n - 1)
            done = True
        finally:
            if not done:
                self.cancelled.append(request.request_id)

    async def GenerateMux(self, request_iterator, context):  # type: ignore[no-untyped-def]
        if not self.mux:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        outer = self

        class Counting:
            async def send_initial_metadata(self, md) -> None:  # type: ignore[no-untyped-def]
                await context.send_initial_metadata(md)

            async def write(self, resp: pb.MuxResponse) -> None:
                outer.messages += 1
                outer.items += len(resp.items)
                await context.write(resp)

        await serve_mux(self.Generate, request_iterator, Counting())  # type: ignore[arg-type]


def _serve(servicer: Stepper) -> StandInServer:
    return StandInServer(_free_port(), servicer=servicer)


@pytest.fixture
def stepper():
    srv = _serve(Stepper())
    yield srv
    srv.stop()


def _req(rid: str, n: int, prompt: str = "hi") -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, prompt=prompt, params=pb.SamplingParams(max_tokens=n))


async def _collect(mux: MuxClient, rid: str, n: int, prompt: str = "hi") -> list[pb.GenerateResponse]:
    return [r async for r in mux.generate(_req(rid, n, prompt))]


def test_concurrent_calls_share_one_stream_batched_per_step(stepper):
    async def main() -> None:
        async with grpc.aio.insecure_channel(stepper.address) as ch:
            mux = MuxClient(pb_grpc.ReplicaStub(ch))
            results = await asyncio.gather(*(_collect(mux, f"r{i}", 8) for i in range(32)))
            for res in results:  # every call complete, in order, ending with its finished response
                assert [r.choices[0].text for r in res] == [f" t{i}" for i in range(8)]
                assert [r.finished for r in res] == [False] * 7 + [True]
            assert mux.supported is True
            mux.close()

    asyncio.run(main())
    s = stepper.servicer
    assert s.items == 32 * 9  # 8 responses + the end of each call
    # one message per step carries every call's token: far fewer messages than tokens
    assert s.messages <= 32 * 9 / 8, (s.messages, s.items)


def test_per_call_errors_and_cancels_leave_the_stream_and_other_calls_alone(stepper):
    async def main() -> None:
        async with grpc.aio.insecure_channel(stepper.address) as ch:
            mux = MuxClient(pb_grpc.ReplicaStub(ch))

            async def fails() -> grpc.aio.AioRpcError:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _collect(mux, "bad", 6, prompt="fail")
                return e.value

            async def leaves_early() -> int:
                got = 0
                async with contextlib.aclosing(mux.generate(_req("early", 50))) as it:
                    async for _ in it:
                        got += 1
                        if got == 2:
                            break
                return got

            err, full, early = await asyncio.gather(fails(), _collect(mux, "good", 10), leaves_early())
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "temperature: scripted"
            assert len(full) == 10 and full[-1].finished
            assert early == 2
            for _ in range(100):  # the cancel reaches the replica's call
                if "early" in stepper.servicer.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert "early" in stepper.servicer.cancelled
            assert len(await _collect(mux, "after", 3)) == 3  # the stream still serves new calls
            mux.close()

    asyncio.run(main())


def test_lost_stream_fails_its_calls_then_reopens():
    srv = _serve(Stepper(step_s=0.02))
    try:
        async def main() -> None:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                mux = MuxClient(pb_grpc.ReplicaStub(ch))
                task = asyncio.create_task(_collect(mux, "long", 10_000))
                await asyncio.sleep(0.3)
                await asyncio.get_running_loop().run_in_executor(None, srv.stop)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await asyncio.wait_for(task, 10)
                # the gateway resumes or retries on these (UNAVAILABLE, CANCELLED)
                assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                mux.close()

        asyncio.run(main())
    finally:
        srv.stop()


def test_replica_without_mux_falls_back_to_generate():
    srv = _serve(Stepper(mux=False))
    try:
        async def main() -> None:
            async with grpc.aio.insecure_channel(srv.address) as ch:
                mux = MuxClient(pb_grpc.ReplicaStub(ch))
                with pytest.raises(MuxUnsupported):
                    await _collect(mux, "x", 2)
                assert mux.supported is False
            client = ReplicaClient(srv.address)
            await client.start()
            call = GenerateCall(request_id="y", model="m", params=SamplingParams(max_tokens=4), prompt="hi")
            chunks = [c async for c in client.generate(call)]
            assert [c.choices[0].text for c in chunks] == [" t0", " t1", " t2", " t3"] and chunks[-1].finished
            assert client.mux is not None and client.mux.supported is False and client.in_flight == 0
            await client.close()

        asyncio.run(main())
        assert srv.servicer.generate_calls == 1  # the fallback's one Generate call
    finally:
        srv.stop()


def test_replica_client_uses_the_mux_stream(stepper):
    async def main() -> None:
        client = ReplicaClient(stepper.address)
        await client.start()
        calls = [GenerateCall(request_id=f"c{i}", model="m", params=SamplingParams(max_tokens=5), prompt="hi")
                 for i in range(8)]

        async def run(call: GenerateCall) -> list[str]:
            return [c.choices[0].text async for c in client.generate(call)]

        outs = await asyncio.gather(*(run(c) for c in calls))
        assert outs == [[f" t{i}" for i in range(5)]] * 8
        assert client.mux is not None and client.mux.supported is True and client.in_flight == 0
        await client.close()

    asyncio.run(main())
    assert stepper.servicer.messages < 8 * 6  # batched, not a message per token


def test_big_batches_are_split_under_the_message_limit(stepper, monkeypatch):
    """Responses of one step that would exceed MAX_MESSAGE_BYTES together go in several
    messages, in order (a burst echoing long prompts must not break the stream)."""
    from scalellm.protocol.grpc import mux

    monkeypatch.setattr(mux, "MAX_MESSAGE_BYTES", 200)  # a few items a message

    async def main() -> None:
        async with grpc.aio.insecure_channel(stepper.address) as ch:
            client = MuxClient(pb_grpc.ReplicaStub(ch))
            results = await asyncio.gather(*(_collect(client, f"r{i}", 4) for i in range(16)))
            assert all([r.choices[0].text for r in res] == [" t0", " t1", " t2", " t3"] for res in results)
            client.close()

    asyncio.run(main())
    s = stepper.servicer
    assert s.items == 16 * 5 and s.messages >= 16 * 4 * 20 // 200  # at most ~8 items a message


def test_batches_helper_keeps_order_and_limits() -> None:
    from scalellm.protocol.grpc.mux import _batches

    items = [pb.MuxItem(stream_id=i, response=pb.GenerateResponse(prompt_text="x" * (50 if i != 3 else 500)))
             for i in range(8)]
    batches = _batches(items, 200)
    assert [it.stream_id for b in batches for it in b] == list(range(8))
    assert all(sum(it.ByteSize() + 8 for it in b) <= 200 or len(b) == 1 for b in batches)
    assert [len(b) for b in batches if any(it.stream_id == 3 for it in b)] == [1]
