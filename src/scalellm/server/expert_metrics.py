"""Prometheus export of a MoE model's expert load: `scalellm_moe_expert_tokens_total
{layer, expert}`, the tokens routed to each expert since the replica started (the core
process reports deltas with its step outputs; `CoreClient.expert_tokens` sums them).
Nothing is exported for dense models."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily


class ExpertLoadCollector:
    def __init__(self, expert_tokens: Callable[[], dict[int, list[int]]]) -> None:
        self._expert_tokens = expert_tokens

    def collect(self):  # type: ignore[no-untyped-def]
        totals = self._expert_tokens()
        if not totals:
            return
        family = CounterMetricFamily("scalellm_moe_expert_tokens", "tokens routed to each expert of each MoE layer",
                                     labels=["layer", "expert"])
        for layer in sorted(totals):
            for expert, n in enumerate(totals[layer]):
                family.add_metric([str(layer), str(expert)], n)
        yield family
