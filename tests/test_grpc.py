"""The replica's gRPC service in a real `scalellm replica` subprocess, through the generated stub."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest

from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.grpc import replica_pb2_grpc as pb_grpc
from test_server import _free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def replica(tiny_models):
    http, grpc_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalellm.entrypoints.cli", "replica", "--model", tiny_models["llama"],
         "--port", str(http), "--grpc-port", str(grpc_port), "--dtype", "float32", "--block-size", "4",
         "--max-model-len", "256", "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pb_grpc.ReplicaStub(channel)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        try:
            if stub.Health(pb.HealthRequest(), timeout=1).ready:
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("replica not ready")
        time.sleep(0.2)
    yield stub, f"http://127.0.0.1:{http}"
    channel.close()
    proc.terminate()
    proc.wait(30)


def _params(**kw) -> pb.SamplingParams:
    return pb.SamplingParams(**kw)


def test_generate_stream_matches_http(replica):
    stub, url = replica
    req = pb.GenerateRequest(request_id="g1", model="tiny", prompt="Once upon a time",
                             params=_params(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True),
                             include_prompt_text=True)
    responses = list(stub.Generate(req, timeout=30))
    text = "".join(c.text for r in responses for c in r.choices)
    ids = [t for r in responses for c in r.choices for t in c.token_ids]
    last = responses[-1]
    assert last.finished and last.completion_tokens == 10 and len(ids) == 10
    assert last.choices[-1].finish_reason == "length"
    assert responses[0].prompt_text == "Once upon a time"
    assert last.timings.e2e > 0 and last.timings.ttft > 0
    ts = last.timestamps
    assert 0 < ts.received <= ts.queued <= ts.first_scheduled <= ts.first_token <= ts.finished <= time.time()
    http = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 10,
                                                     "temperature": 0.8, "seed": 3, "ignore_eos": True}).json()
    assert http["choices"][0]["text"] == text


def test_generate_chat_tokens_and_logprobs(replica):
    stub, _ = replica
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    req = pb.GenerateRequest(model="tiny", messages=msgs, add_generation_prompt=True,
                             params=_params(temperature=0, max_tokens=4, logprobs=2, ignore_eos=True))
    responses = list(stub.Generate(req, timeout=30))
    lps = [lp for r in responses for c in r.choices for lp in c.logprobs]
    assert len(lps) == 4 and all(len(lp.top) == 2 for lp in lps)
    tok = stub.Tokenize(pb.TokenizeRequest(messages=msgs))
    assert responses[-1].prompt_tokens == len(tok.tokens)
    ids_req = pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=list(tok.tokens)),
                                 params=_params(temperature=0, max_tokens=4, ignore_eos=True))
    again = [t for r in stub.Generate(ids_req, timeout=30) for c in r.choices for t in c.token_ids]
    assert again == [lp.token_id for lp in lps]


def test_invalid_argument_and_not_found(replica):
    stub, _ = replica
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(model="tiny", prompt="x", params=_params(top_p=2.0)), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(model="nope", prompt="x"), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(model="tiny", prompt="x", params=_params(max_tokens=5000)), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "5000" in e.value.details()


def test_cancel_and_abort_free_blocks(replica):
    stub, _ = replica
    call = stub.Generate(pb.GenerateRequest(request_id="long1", model="tiny", prompt="Once upon a time",
                                            params=_params(max_tokens=240, ignore_eos=True)), timeout=60)
    next(call)
    assert stub.Load(pb.LoadRequest()).kv_blocks_used > 0
    call.cancel()
    _wait_idle(stub)
    # explicit Abort by id
    call = stub.Generate(pb.GenerateRequest(request_id="long2", model="tiny", prompt="Once upon a time",
                                            params=_params(max_tokens=240, ignore_eos=True)), timeout=60)
    next(call)
    assert stub.Abort(pb.AbortRequest(request_id="long2")).found
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.ABORTED and time.monotonic() - t0 < 5
    _wait_idle(stub)


def test_deadline(replica):
    stub, _ = replica
    req = pb.GenerateRequest(model="tiny", prompt="Once upon a time", deadline_unix=time.time() + 0.05,
                             params=_params(max_tokens=240, ignore_eos=True))
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert e.value.details() == "request deadline passed; aborted"  # the server's, not the client's timeout
    assert time.monotonic() - t0 < 5
    _wait_idle(stub)  # the engine drops the expired request (asynchronously, within a step or two)


def _wait_idle(stub, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        load = stub.Load(pb.LoadRequest())
        if load.num_running == 0 and load.kv_blocks_used == 0:
            return
        time.sleep(0.05)
    load = stub.Load(pb.LoadRequest())
    assert load.num_running == 0 and load.kv_blocks_used == 0, load


def test_load_models_health(replica):
    stub, _ = replica
    _wait_idle(stub)
    load = stub.Load(pb.LoadRequest())
    assert load.kv_blocks_total > 0 and load.num_running == 0
    # StreamLoad: at once, then while idle (the load unchanged) only at the 2 s heartbeat
    stream = stub.StreamLoad(pb.LoadRequest(interval_ms=20), timeout=15)
    t0 = time.monotonic()
    assert next(stream).kv_blocks_total == load.kv_blocks_total
    assert next(stream) == load and time.monotonic() - t0 >= 1.5
    # ... and every interval while it changes: a generation running
    req = pb.GenerateRequest(model="tiny", prompt="Once upon a time", params=_params(max_tokens=200, ignore_eos=True))
    worker = threading.Thread(target=lambda: list(stub.Generate(req, timeout=60)))
    t1 = time.monotonic()
    worker.start()
    busy = next(stream)
    assert time.monotonic() - t1 < 1.5 and busy != load
    stream.cancel()
    worker.join(60)
    _wait_idle(stub)
    models = stub.Models(pb.ModelsRequest())
    assert list(models.models) == ["tiny"] and models.max_model_len == 256


def test_generated_stubs_are_up_to_date(tmp_path):
    from grpc_tools import protoc

    src = os.path.join(ROOT, "src")
    rc = protoc.main(["protoc", f"-I{src}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      os.path.join(src, "scalellm/protocol/grpc/replica.proto")])
    assert rc == 0
    # NOTE: the grpc stub names the grpcio-tools release that made it (GRPC_GENERATED_VERSION, the
    # oldest grpcio it runs on: pyproject's minimum); a newer grpcio-tools writes its own release
    # there (1.85.4 did, the day it came out), so that line is left out of the comparison.
    def body(path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return "".join(line for line in f if not line.startswith("GRPC_GENERATED_VERSION = "))

    for name in ("replica_pb2.py", "replica_pb2_grpc.py"):
        fresh = body(str(tmp_path / "scalellm/protocol/grpc" / name))
        assert fresh == body(os.path.join(src, "scalellm/protocol/grpc", name)), \
            f"{name} is stale: regenerate with grpc_tools.protoc"
