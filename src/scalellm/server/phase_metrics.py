"""Prometheus export of where the engine-core process's time goes:
`scalellm_engine_phase_seconds_total{phase}` for the phases of protocol.ipc.CORE_PHASES
(schedule, prepare, forward, sample, update, ipc, idle), cumulative since start. The
core sends the totals with every step's load report; this reads the latest."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily

from scalellm.protocol.ipc import CORE_PHASES


class PhaseCollector:
    def __init__(self, phase_seconds: Callable[[], list[float]]) -> None:
        self._phase_seconds = phase_seconds

    def collect(self):  # type: ignore[no-untyped-def]
        seconds = self._phase_seconds()
        if not seconds:
            return
        family = CounterMetricFamily("scalellm_engine_phase_seconds",
                                     "engine-core process wall time by phase, since start", labels=["phase"])
        for name, value in zip(CORE_PHASES, seconds):
            family.add_metric([name], value)
        yield family
