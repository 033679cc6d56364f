"""`scalellm bench`: statistics against hand-computed cases, the SSE parser's edge cases,
runs against a stand-in server with programmed delays (a real socket server in its own
process), the result JSON and plots, and a short run against a real `scalellm serve`."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time

import pytest
from conftest import SMOLLM_GGUF, assert_not_imported, requires_smollm

from scalellm.bench import workload as wl
from scalellm.bench.endpoint import Endpoint, EndpointConfig
from scalellm.bench.records import BenchRequest, RequestRecord
from scalellm.bench.results import TOP_KEYS
from scalellm.bench.runner import LoadPoint, Runner
from scalellm.bench.sse import SSEParser
from scalellm.bench.stats import SLO, distribution, itls_ms, percentile, summarize, tpot_ms, ttft_ms
from scalellm.bench.timings import breakdown, from_usage, parse_server_timing
from scalellm.entrypoints.cli import main as cli_main


def _run(coro):  # type: ignore[no-untyped-def]
    import uvloop

    return uvloop.run(coro)


# -- statistics ------------------------------------------------------------------------------
def test_percentile_interpolates_like_numpy():
    xs = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 10.0
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(4.0 + 0.6 * 6.0)  # k = 3.6
    assert percentile([7.0], 99) == 7.0
    d = distribution([3.0, 1.0, 2.0])
    assert d == {"count": 3, "mean": 2.0, "p50": 2.0, "p90": pytest.approx(2.8), "p99": pytest.approx(2.98),
                 "min": 1.0, "max": 3.0}
    assert distribution([])["count"] == 0 and distribution([])["p50"] is None


def _rec(sent: float, first: float | None, chunks: list[float], end: float, out: int, **kw) -> RequestRecord:
    r = RequestRecord(request_id=0, endpoint="A", scheduled=sent, sent=sent, first_token_at=first,
                      chunk_times=chunks, end=end, status=200, output_tokens=out, output_token_source="usage",
                      is_ok=True, **kw)
    return r


def test_request_metrics_and_summary_by_hand():
    # request 1: sent at 0, tokens at 0.1, 0.15, 0.25; done at 0.25; 3 tokens, 10 prompt tokens
    r1 = _rec(0.0, 0.1, [0.1, 0.15, 0.25], 0.25, 3, input_tokens=10)
    # request 2: sent at 0.5, tokens at 0.8, 1.0; done at 1.0; 2 tokens
    r2 = _rec(0.5, 0.8, [0.8, 1.0], 1.0, 2, input_tokens=20)
    bad = RequestRecord(request_id=2, endpoint="A", scheduled=0.2, sent=0.2, end=0.3, status=500,
                        error="http_500", error_message="boom")
    assert ttft_ms(r1) == pytest.approx(100.0) and ttft_ms(r2) == pytest.approx(300.0)
    assert tpot_ms(r1) == pytest.approx(75.0)  # (0.25 - 0.1) / 2
    assert tpot_ms(r2) == pytest.approx(200.0)
    assert itls_ms(r1) == pytest.approx([50.0, 100.0])
    s = summarize([r1, r2, bad], SLO.parse("ttft_ms=150,tpot_ms=100"))
    assert s["num_ok"] == 2 and s["num_errors"] == 1 and s["errors"] == {"http_500": 1}
    assert s["duration_s"] == pytest.approx(1.0)  # first send 0.0 -> last end 1.0
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["input_token_throughput"] == pytest.approx(30.0)
    assert s["output_token_throughput"] == pytest.approx(5.0)
    assert s["total_token_throughput"] == pytest.approx(35.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0) and s["ttft_ms"]["max"] == pytest.approx(300.0)
    assert s["itl_ms"]["count"] == 3 and s["itl_ms"]["p50"] == pytest.approx(100.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(375.0)  # 250 and 500
    # only r1 meets ttft <= 150 and tpot <= 100; the failed request counts in the fraction
    assert s["goodput"]["num_met"] == 1 and s["goodput"]["fraction"] == pytest.approx(1 / 3)
    assert s["goodput"]["request_throughput"] == pytest.approx(1.0)
    assert SLO.parse("e2e_ms=300").is_met(r1) and not SLO.parse("e2e_ms=300").is_met(r2)
    with pytest.raises(ValueError):
        SLO.parse("latency=3")


def test_server_timings_parse_and_breakdown():
    assert parse_server_timing('gateway;dur=1.5, queue;desc="q";dur=2, bad, x;desc=y, total;dur=10') == {
        "gateway": 1.5, "queue": 2.0, "total": 10.0}
    assert from_usage({"prefill_ms": 3, "decode_ms": 4.5, "note": "x", "flag": True}) == {"prefill": 3.0,
                                                                                          "decode": 4.5}
    parts = breakdown({"gateway": 1.0, "queue": 2.0, "prefill": 3.0, "decode": 4.0, "total": 10.0, "ttft": 6.0}, 12.5)
    assert list(parts) == ["client_network", "gateway", "queue", "prefill", "decode"]
    assert parts["client_network"] == pytest.approx(2.5)
    assert breakdown({}, 5.0) == {}


# -- SSE -------------------------------------------------------------------------------------------
STREAM = (b": keep-alive\r\n\r\n"
          b"event: message\r\ndata: {\"a\": 1}\r\n\r\n"
          b"data: line1\ndata: line2\n\n"
          b"id: 7\nretry: 10\ndata:no-space\r\r"
          b"event: error\ndata: {\"error\": \"x\"}\n\n"
          b"data\n\n"
          b"data: [DONE]\n\n")
EXPECTED = [(b"message", b'{"a": 1}'), (b"message", b"line1\nline2"), (b"message", b"no-space"),
            (b"error", b'{"error": "x"}'), (b"message", b""), (b"message", b"[DONE]")]


def test_sse_parser_whole_and_split_at_every_byte():
    assert SSEParser().feed(STREAM) == EXPECTED
    for cut in range(1, len(STREAM)):
        p = SSEParser()
        assert p.feed(STREAM[:cut]) + p.feed(STREAM[cut:]) == EXPECTED, cut
    p = SSEParser()
    events = [e for i in range(len(STREAM)) for e in p.feed(STREAM[i:i + 1])]
    assert events == EXPECTED


def test_sse_parser_crlf_split_between_cr_and_lf_and_unterminated_end():
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\n\r") == [(b"message", b"a")]
    assert p.feed(b"\ndata: b") == []  # the CR, LF pair is one line end, not two
    assert p.close() == [(b"message", b"b")]


# -- workload ---------------------------------------------------------------------------------------
class WordCounter:
    """Counts like the stand-in's /tokenize: words + 1 (BOS); chat: words + 1 per message + 1."""

    source = "test"

    async def count(self, prompt=None, messages=None, add_special_tokens=True):  # type: ignore[no-untyped-def]
        if messages is not None:
            return sum(len(m["content"].split()) + 1 for m in messages) + 1
        return len((prompt or "").split()) + 1


def test_length_specs():
    rng = random.Random(0)
    assert wl.LengthSpec.parse("7").sample(rng) == 7
    u = wl.LengthSpec.parse("3:5")
    assert {u.sample(rng) for _ in range(200)} == {3, 4, 5}
    e = wl.LengthSpec.parse("exp:50")
    assert 35 < sum(e.sample(rng) for _ in range(2000)) / 2000 < 65
    for bad in ("0", "5:3", "x", "exp:"):
        with pytest.raises(ValueError):
            wl.LengthSpec.parse(bad)


def test_synthetic_prompts_exact_lengths_shared_prefix_and_determinism():
    cfg = wl.WorkloadConfig(num_requests=12, input_len=wl.LengthSpec.parse("20"),
                            output_len=wl.LengthSpec.parse("4:9"), seed=3, shared_prefix_groups=3,
                            shared_prefix_len=30)
    reqs = _run(wl.build(cfg, WordCounter()))
    assert [r.input_len for r in reqs] == [50] * 12
    assert all(4 <= r.output_len <= 9 for r in reqs)
    prefixes = {r.group: r.prompt.split("\n")[0] for r in reqs}
    assert set(prefixes) <= {0, 1, 2} and len(set(prefixes.values())) == len(prefixes)
    for r in reqs:
        assert r.prompt.startswith(prefixes[r.group] + "\n")
    assert len({r.prompt for r in reqs}) == 12
    assert _run(wl.build(cfg, WordCounter())) == reqs  # same seed, same workload
    chat = _run(wl.build(wl.WorkloadConfig(num_requests=3, input_len=wl.LengthSpec.parse("16"), is_chat=True),
                         WordCounter()))
    assert [r.input_len for r in chat] == [16] * 3 and chat[0].messages[0]["role"] == "user"


def test_prompt_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a b c", "output_len": 5}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "x y"}]}) + "\n")
    reqs = _run(wl.build(wl.WorkloadConfig(num_requests=4, is_chat=True, prompt_file=str(f),
                                           output_len=wl.LengthSpec.parse("9")), WordCounter()))
    assert sorted(r.output_len for r in reqs) == [5, 5, 9, 9]
    assert all(r.messages is not None for r in reqs)
    with pytest.raises(ValueError, match="--api chat"):
        _run(wl.build(wl.WorkloadConfig(num_requests=1, prompt_file=str(f)), WordCounter()))


# -- against a stand-in server (real sockets, its own process) ---------------------------------------
class Standin:
    def __init__(self, *flags: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "scalellm.bench.standin", "--port", "0", *flags],
                                     stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline().split()[1])}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def slow_standin():
    s = Standin("--ttft-ms", "80", "--itl-ms", "20", "--timings")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def odd_standin():
    s = Standin("--ttft-ms", "5", "--itl-ms", "2", "--crlf", "--comments", "--split", "--timings")
    yield s
    s.stop()


def _bench(url: str, point: LoadPoint, n: int = 6, out_len: int = 6, **cfg):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        ep = Endpoint(EndpointConfig(url=url, **cfg))
        await ep.prepare()
        reqs = [BenchRequest(i, "one two three", None, 4, out_len) for i in range(n)]
        res = await Runner([ep], reqs).run([point])
        ep.close()
        return res[0]

    return _run(go())


def test_programmed_delays_are_measured(slow_standin):
    res = _bench(slow_standin.url, LoadPoint(concurrency=2, num_requests=6), n=6, out_len=6)
    s = res.summary
    assert s["num_ok"] == 6 and s["output_tokens"]["mean"] == 6
    # programmed: first token after 80 ms, then one every 20 ms (loaded 2-core machine: generous bounds)
    assert 78 <= s["ttft_ms"]["p50"] <= 100, s["ttft_ms"]
    assert 19 <= s["itl_ms"]["p50"] <= 28, s["itl_ms"]
    assert 19 <= s["tpot_ms"]["p50"] <= 28, s["tpot_ms"]
    assert 178 <= s["e2e_ms"]["p50"] <= 220, s["e2e_ms"]
    assert all(len(r.chunk_times) == 6 for r in res.records)
    # the stand-in's timings: Server-Timing header + usage.timings, and client_network derived
    assert set(s["breakdown_ms"]) == {"client_network", "gateway", "queue", "prefill", "decode"}
    assert s["breakdown_ms"]["prefill"] == 80.0 and s["breakdown_ms"]["decode"] == 100.0


def test_odd_sse_chat_and_non_stream(odd_standin):
    s = _bench(odd_standin.url, LoadPoint(concurrency=3, num_requests=9), n=9, out_len=5, api="chat").summary
    assert s["num_ok"] == 9 and s["total_output_tokens"] == 45 and s["itl_ms"]["count"] == 9 * 4
    assert s["output_token_sources"] == {"usage": 9}
    s = _bench(odd_standin.url, LoadPoint(concurrency=2, num_requests=4), n=4, out_len=5, is_stream=False).summary
    assert s["num_ok"] == 4 and s["total_output_tokens"] == 20 and s["ttft_ms"]["count"] == 0
    assert s["e2e_ms"]["p50"] >= 13  # 5 + 4 x 2 ms


def test_open_loop_poisson_arrivals(odd_standin):
    t0 = time.perf_counter()
    res = _bench(odd_standin.url, LoadPoint(request_rate=100.0, num_requests=30), n=30, out_len=2)
    wall = time.perf_counter() - t0
    arrivals = sorted(r.scheduled for r in res.records)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert res.summary["num_ok"] == 30 and 0.05 < sum(gaps) < 1.0 and wall < 5
    assert res.summary["client"]["send_lag_ms"]["p50"] < 5
    assert res.summary["client"]["send_lag_ms"]["min"] >= 0  # never sent before its arrival time


def test_timeouts_and_refused_connections_are_errors(slow_standin):
    s = _bench(slow_standin.url, LoadPoint(concurrency=2, num_requests=4), n=4, timeout=0.03).summary
    assert s["num_ok"] == 0 and s["errors"] == {"timeout": 4}
    with pytest.raises(Exception, match="connect"):
        _bench("http://127.0.0.1:9", LoadPoint(concurrency=1, num_requests=1))


def test_cli_end_to_end_json_schema_plots_and_compare(slow_standin, odd_standin, tmp_path):
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    rc = cli_main(["bench", "--url", slow_standin.url, "--compare", odd_standin.url, "--concurrency", "1,4",
                   "--num-requests", "8", "--input-len", "12", "--output-len", "4", "--warmup", "2",
                   "--slo", "ttft_ms=50", "--out", str(out), "--plot", str(plots), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert tuple(doc) == TOP_KEYS and doc["schema"] == "scalellm.bench/1"
    assert [e["label"] for e in doc["endpoints"]] == ["A", "B"]
    assert doc["workload"]["fit_misses"] == 0 and doc["workload"]["num_requests"] == 10
    assert len(doc["runs"]) == 4 and {r["point"]["label"] for r in doc["runs"]} == {"c=1", "c=4"}
    for run in doc["runs"]:
        s = run["summary"]
        assert s["num_ok"] == 8 and len(run["records"]) == 8
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(s[key]) == {"count", "mean", "p50", "p90", "p99", "min", "max"}
        assert {"request_throughput", "output_token_throughput", "goodput", "errors", "client"} <= set(s)
        rec = run["records"][0]
        assert {"request_id", "sent_s", "first_token_s", "end_s", "chunk_times_s", "input_tokens",
                "output_tokens", "server_timings_ms", "error"} <= set(rec)
        assert rec["input_tokens"] == 12 and rec["output_tokens"] == 4
    # A has an 80 ms TTFT, B 5 ms: B misses no SLO, A all of them; the ratio shows B faster
    by = {(r["endpoint"], r["point"]["label"]): r["summary"] for r in doc["runs"]}
    assert by[("A", "c=1")]["goodput"]["num_met"] == 0 and by[("B", "c=1")]["goodput"]["num_met"] == 8
    assert len(doc["comparison"]) == 2 and all(c["b_over_a"]["ttft_ms.p50"] < 0.3 for c in doc["comparison"])
    assert doc["environment"]["cpu_count"] and doc["environment"]["versions"]["scalellm"]
    for name in ("latency.png", "throughput.png", "breakdown.png", "compare.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 15_000, name


@pytest.mark.parametrize("kernel_stamps", [True, False])
def test_chunk_stamp_is_arrival_time_not_read_time(kernel_stamps):
    """A busy client loop must not delay the stamps: with kernel stamps (the default on
    Linux plain http) a response that arrived 50 ms after the request, while the loop was
    blocked from 10 to 160 ms, is stamped when it arrived; with read-time stamps the block shows up in full."""
    import asyncio
    import socket
    import threading

    from scalellm.bench.http_client import BufferSink, ConnectionPool

    srv = socket.create_server(("127.0.0.1", 0))
    body = b"data: x\n\n"
    resp = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        time.sleep(0.05)
        conn.sendall(resp)
        conn.recv(65536)  # until the client closes
        conn.close()

    threading.Thread(target=serve, daemon=True).start()

    class Sink(BufferSink):
        t = 0.0

        def on_body(self, data: bytes, t: float) -> None:
            super().on_body(data, t)
            Sink.t = t

    async def go() -> tuple[float, float]:
        pool = ConnectionPool(f"http://127.0.0.1:{srv.getsockname()[1]}", kernel_stamps=kernel_stamps)
        assert pool.kernel_stamps is (kernel_stamps and sys.platform == "linux")
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, time.sleep, 0.15)  # the loop is stuck when the response arrives (50 ms)
        sink = Sink()
        task = asyncio.ensure_future(pool.request(pool.encode("GET", "/", {}), sink, timeout=5))
        await asyncio.sleep(0)
        t_sent = await task
        pool.close()
        assert bytes(sink.body) == body and sink.status == 200
        return t_sent, Sink.t

    t_sent, t = _run(go())
    srv.close()
    if kernel_stamps and sys.platform == "linux":
        assert 0.045 <= t - t_sent < 0.1
    else:
        assert t - t_sent >= 0.15


def test_bench_never_imports_torch():
    assert_not_imported("import scalellm.bench.cli, scalellm.bench.runner, scalellm.bench.report, "
                        "scalellm.bench.plots, scalellm.bench.tokens", "torch")


# -- against a real `scalellm serve` ------------------------------------------------------------------
@requires_smollm
def test_against_scalellm_serve(tmp_path):
    import contextlib
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "scalellm.entrypoints.cli", "serve", "--model", SMOLLM_GGUF,
                             "--port", str(port), "--max-model-len", "256", "--kv-cache-memory", "0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the port opens before the replica is ready
            assert proc.poll() is None, "server exited"
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
                if r.status == 200:
                    break
            time.sleep(0.2)
        out = tmp_path / "serve.json"
        # NOTE: SmolLM2's chat template adds a ~30-token system prompt, so chat prompts are longer
        for api, n, n_in in (("completions", 4, 24), ("chat", 2, 48)):
            rc = cli_main(["bench", "--url", url, "--api", api, "--concurrency", "2", "--num-requests", str(n),
                           "--input-len", str(n_in), "--output-len", "3", "--out", str(out), "--no-progress"])
            assert rc == 0
            doc = json.loads(out.read_text(encoding="utf-8"))
            assert doc["workload"]["token_counter"].startswith("server:")
            s = doc["runs"][0]["summary"]
            assert s["num_ok"] == n and s["output_token_sources"] == {"usage": n}
            for rec in doc["runs"][0]["records"]:
                # exact prompt length (fitted with the server's /tokenize; usage agrees) and ignore_eos
                assert rec["input_tokens"] == n_in and rec["output_tokens"] == 3
                assert 0 < rec["first_token_s"] - rec["sent_s"] < rec["end_s"] - rec["sent_s"]
            assert math.isfinite(s["tpot_ms"]["p50"]) and s["tpot_ms"]["p50"] > 0
            if s.get("breakdown_ms"):  # the server's own timings, when it sends them
                assert all(v >= 0 for v in s["breakdown_ms"].values())
    finally:
        proc.terminate()
        proc.wait(30)


def test_progress_and_report_render(slow_standin):
    from rich.console import Console

    from scalellm.bench.report import RichProgress, print_report

    res = _bench(slow_standin.url, LoadPoint(concurrency=1, num_requests=2), n=2, out_len=2)
    con = Console(record=True, width=200, file=open("/dev/null", "w"))  # noqa: SIM115
    p = RichProgress(con)
    p.begin("x", 2, None)
    p.update(1, 0, 5)
    p.end()
    print_report([res], [], ["a note"], console=con)
    text = con.export_text()
    assert "endpoint A" in text and "TTFT" in text and "a note" in text


def test_settle_pauses_before_each_measured_run(odd_standin):
    """--settle: quiet time after the warm-ups and between A and B, so no server is still busy
    with earlier work (vLLM's CPU server spins a core ~1.5 s after its last request)."""
    async def go():  # type: ignore[no-untyped-def]
        eps = [Endpoint(EndpointConfig(url=odd_standin.url, label=label)) for label in ("A", "B")]
        for ep in eps:
            await ep.prepare()
        reqs = [BenchRequest(i, "one two three", None, 4, 3) for i in range(5)]
        t0 = time.perf_counter()
        res = await Runner(eps, reqs, num_warmup=1, settle_s=0.4).run([LoadPoint(concurrency=2, num_requests=4)])
        wall = time.perf_counter() - t0
        for ep in eps:
            ep.close()
        return res, wall

    res, wall = _run(go())
    assert [r.summary["num_ok"] for r in res] == [4, 4]
    assert wall >= 0.8  # one pause before A's run and one before B's
    first = {r.endpoint: min(x.sent for x in r.records) for r in res}
    last = {r.endpoint: max(x.end for x in r.records) for r in res}
    assert first["B"] - last["A"] >= 0.4
