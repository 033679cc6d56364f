"""Helpers shared by the benchmark scripts that start servers themselves."""

from __future__ import annotations

import subprocess
import time
import urllib.request


def wait_ready(proc: subprocess.Popen, url: str, what: str = "server", timeout: float = 300,
               interval: float = 0.2) -> float:
    """Poll `url`/ready every `interval` s until it answers 200; returns the seconds waited.
    Raises when the process exits first or `timeout` passes."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{what} not ready after {timeout:g} s")


def stop_all(procs: list[subprocess.Popen], timeout: float = 60) -> None:
    """SIGTERM every process (servers drain), then wait; kill what outlives `timeout`."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
