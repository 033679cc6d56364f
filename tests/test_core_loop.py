"""The engine-core process's busy loop over real ZeroMQ sockets, with a stand-in engine
core that records what each step saw: an idle core gathers a burst's requests before its
first step, and does not hold a lone request back beyond the gap."""

from __future__ import annotations

import os
import threading
import time

import pytest
import zmq

from scalellm.protocol import ipc
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.protocol.step import CoreRequest
from scalellm.server import core_process


class RecordingCore:
    def __init__(self) -> None:
        self.pending: list[str] = []
        self.steps: list[list[str]] = []

    def has_unfinished_requests(self) -> bool:
        return bool(self.pending)

    def add_core_request(self, req: CoreRequest) -> None:
        self.pending.append(req.request_id)

    def abort_requests(self, request_ids) -> None:  # type: ignore[no-untyped-def]
        self.pending = [r for r in self.pending if r not in set(request_ids)]

    def step(self) -> list:
        self.steps.append(list(self.pending))
        self.pending.clear()
        return []

    def check_health(self) -> None:
        pass

    def read_expert_load(self) -> dict:
        return {}


def _request(rid: str) -> bytes:
    req = CoreRequest(rid, [1, 2, 3], SamplingParams(max_tokens=1), [], 1)
    return ipc.encode(ipc.AddRequests([req]))


@pytest.fixture
def loop(monkeypatch):
    monkeypatch.setenv("SCALELLM_NO_KV_PREFAULT", "1")  # no idle work: the stand-in has none
    monkeypatch.setattr(core_process, "_load", lambda core: ipc.EngineLoad())
    # generous windows, so a loaded CI machine's scheduling delays stay inside them
    monkeypatch.setattr(core_process, "COALESCE_GAP_MS", 100)
    monkeypatch.setattr(core_process, "COALESCE_MAX_MS", 1000)
    ctx = zmq.Context()
    to_core, core_in = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    core_out, from_core = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    core_in.bind("inproc://to_core")
    to_core.connect("inproc://to_core")
    from_core.bind("inproc://from_core")
    core_out.connect("inproc://from_core")
    core = RecordingCore()
    thread = threading.Thread(target=core_process._busy_loop, args=(core, core_in, core_out, os.getppid()))
    thread.start()
    yield core, to_core, from_core
    to_core.send(ipc.encode(ipc.Shutdown()))
    thread.join(10)
    assert not thread.is_alive()
    for s in (to_core, core_in, core_out, from_core):
        s.close(linger=0)
    ctx.term()


def test_an_idle_core_gathers_a_burst_before_its_first_step(loop):
    core, to_core, from_core = loop
    for i in range(5):  # a burst arriving one by one, 10 ms apart
        to_core.send(_request(f"b{i}"))
        time.sleep(0.01)
    assert from_core.poll(5000)
    ipc.decode_from_core(from_core.recv())
    assert core.steps == [[f"b{i}" for i in range(5)]]


def test_a_lone_request_waits_only_for_the_gap(loop):
    core, to_core, from_core = loop
    t0 = time.monotonic()
    to_core.send(_request("alone"))
    assert from_core.poll(5000)
    waited = time.monotonic() - t0
    from_core.recv()
    to_core.send(_request("later"))
    assert from_core.poll(5000)
    from_core.recv()
    assert core.steps == [["alone"], ["later"]]
    assert waited < 0.9  # one 100 ms gap with nothing coming, not the 1 s cap
