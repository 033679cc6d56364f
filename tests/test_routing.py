"""Routing policies on fabricated replicas and load reports (no processes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from scalellm.gateway.routing import LeastLoad, PowerOfTwo, PrefixAffinity, RoundRobin, make_policy
from scalellm.protocol.generation import GenerateCall
from scalellm.protocol.sampling_params import SamplingParams


@dataclass
class Load:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0


@dataclass
class Replica:
    address: str
    in_flight: int = 0
    healthy: bool = True
    load: Load = field(default_factory=Load)


def call(prompt: str = "hello") -> GenerateCall:
    return GenerateCall("r", "m", SamplingParams(), prompt=prompt)


def test_round_robin_cycles():
    rs = [Replica("a"), Replica("b"), Replica("c")]
    p = RoundRobin()
    assert [p.choose(rs, call()).address for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_load_uses_reports_and_in_flight():
    rs = [Replica("a", in_flight=3), Replica("b", load=Load(num_running=5)), Replica("c", in_flight=1)]
    assert LeastLoad().choose(rs, call()).address == "c"
    rs[2].load = Load(num_running=2, num_waiting=7)  # reported backlog beats our own count
    assert LeastLoad().choose(rs, call()).address == "a"
    rs = [Replica("a", load=Load(kv_blocks_used=10)), Replica("b", load=Load(kv_blocks_used=2))]
    assert LeastLoad().choose(rs, call()).address == "b"  # tie broken by KV use


def test_power_of_two_never_picks_the_worst_of_two():
    rs = [Replica("busy", in_flight=100), Replica("idle")]
    p = PowerOfTwo(seed=1)
    assert {p.choose(rs, call()).address for _ in range(20)} == {"idle"}


def test_prefix_affinity_sticks_and_falls_back():
    rs = [Replica("a"), Replica("b")]
    p = PrefixAffinity(chunk_chars=8, imbalance=4)
    system = "You are a helpful assistant. " * 4
    first = p.choose(rs, call(system + "question one")).address
    for i in range(5):
        rs[0 if first == "a" else 1].in_flight += 1 if i < 3 else 0
        assert p.choose(rs, call(system + f"question {i}")).address == first
    # overload the owner beyond the threshold: traffic goes to the least loaded
    owner = rs[0] if first == "a" else rs[1]
    owner.in_flight = 20
    assert p.choose(rs, call(system + "question x")).address != first
    # an unrelated prompt goes to the least loaded replica
    assert p.choose(rs, call("completely different text here")).address != owner.address


def test_make_policy_rejects_unknown():
    import pytest

    assert make_policy("least_load").name == "least_load"
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random_walk")
