"""Prometheus export of where the engine-core process's time goes:
`scalellm_engine_phase_seconds_total{phase}` for the phases of protocol.ipc.CORE_PHASES
(schedule, prepare, forward, sample, update, ipc, idle), cumulative since start; and what
the scheduler expects of a step: `scalellm_engine_step_cost_ms{term}` (its fitted cost per
step, per decode, per prefill token) and `scalellm_engine_step_target_ms` (the step time
it aims at; 0 without a target). The core sends them with every step's load report; this
reads the latest."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from scalellm.protocol.ipc import CORE_PHASES, EngineLoad

STEP_COST_TERMS = ("per_step", "per_decode", "per_prefill_token")


class PhaseCollector:
    def __init__(self, load: Callable[[], EngineLoad]) -> None:
        self._load = load

    def collect(self):  # type: ignore[no-untyped-def]
        load = self._load()
        if load.phase_seconds:
            family = CounterMetricFamily("scalellm_engine_phase_seconds",
                                         "engine-core process wall time by phase, since start", labels=["phase"])
            for name, value in zip(CORE_PHASES, load.phase_seconds):
                family.add_metric([name], value)
            yield family
        if load.step_cost_ms:
            cost = GaugeMetricFamily("scalellm_engine_step_cost_ms",
                                     "the scheduler's fitted step cost: ms per step, per decode, per prefill token",
                                     labels=["term"])
            for term, value in zip(STEP_COST_TERMS, load.step_cost_ms):
                cost.add_metric([term], value)
            yield cost
        yield GaugeMetricFamily("scalellm_engine_step_target_ms",
                                "the step time the scheduler aims at (0: no target)", value=load.step_target_ms)
