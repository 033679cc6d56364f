"""The gateway in front of a replica that is still starting: a real `scalellm gateway`
process and a scripted replica stand-in (real gRPC, no model) that appears late and
says not-ready for a while. Until its first good probe a replica is starting, not
failing: the gateway must take it in as soon as it is ready, without a breaker
cooldown in between."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from standin import StandInServer
from test_server import _free_port


def test_gateway_takes_a_starting_replica_in_as_soon_as_it_is_ready(tmp_path):
    replica_port, port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    gw = subprocess.Popen([sys.executable, "-m", "scalellm.entrypoints.cli", "gateway", "--port", str(port),
                           "--admin-key", "adm", "--replica", f"127.0.0.1:{replica_port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    standin = None
    try:
        time.sleep(1.5)  # the gateway probes a port nobody listens on yet
        standin = StandInServer(replica_port)
        standin.servicer.ready = False  # up, loading: Health says not ready
        time.sleep(1.5)
        t_ready = time.monotonic()
        standin.servicer.ready = True
        while True:
            assert gw.poll() is None, "gateway exited"
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t_ready < 10, "gateway never took the replica in"
            time.sleep(0.02)
        waited = time.monotonic() - t_ready
        # the breaker's first cooldown alone is 1 s; a starting replica is polled every 50 ms
        assert waited < 0.6, f"ready {waited:.2f} s after the replica"
        rep = httpx.get(f"{url}/admin/replicas", headers={"authorization": "Bearer adm"}).json()
        desc = rep["replicas"][0] if isinstance(rep, dict) else rep[0]
        assert desc["breaker"] == "closed" and desc["starting"] is False and desc["healthy"] is True
        r = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        gw.terminate()
        gw.wait(30)
        if standin is not None:
            standin.stop()
