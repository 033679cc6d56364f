"""Unit tests of the gateway's safety and control pieces (no processes): keys, token
buckets, content filters (streamed == whole, bounded hold-back), admission queue,
circuit breaker, adaptive pools, and the config loader's strictness."""

from __future__ import annotations

import asyncio
import random

import pytest

from scalellm.api.admission import Admission, AdmissionConfig, Overloaded
from scalellm.api.safety import ApiKey, ContentFilter, FilterHit, FilterRule, KeyStore, TokenBucket, parse_keys
from scalellm.gateway.config import load_config
from scalellm.gateway.health import BreakerState, CircuitBreaker
from scalellm.gateway.routing import AdaptivePools
from scalellm.protocol.generation import GenerateCall
from scalellm.protocol.sampling_params import SamplingParams


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_keys_parse_and_lookup():
    keys = parse_keys("# comment\nteam-a:secret-a\nsecret-b  # anonymous id\n, team-c : secret-c")
    assert [k.key_id for k in keys][0] == "team-a" and keys[1].key_id.startswith("key-")
    store = KeyStore(keys)
    assert store.lookup("secret-a").key_id == "team-a"
    assert store.lookup("secret-c").key_id == "team-c"
    assert store.lookup("secret-a ") is None and store.lookup("") is None
    with pytest.raises(ValueError):
        parse_keys("x:1\nx:2")
    with pytest.raises(ValueError):
        ApiKey.from_secret("")


def test_token_bucket():
    clock = Clock()
    b = TokenBucket(60, clock)  # one per second, burst 60
    assert all(b.try_take() == 0 for _ in range(60))
    assert b.try_take() == pytest.approx(1.0)
    clock.t += 2.5
    assert b.try_take() == 0 and b.try_take() == 0 and b.try_take() > 0
    t = TokenBucket(600, clock)  # tokens/min: charged afterwards, may go into debt
    t.charge(900)
    assert t.wait_until_positive() == pytest.approx(30.0, rel=1e-6)
    clock.t += 31
    assert t.wait_until_positive() == 0


def test_filter_whole_text():
    f = ContentFilter([FilterRule("secret", "redact"), FilterRule("secretive", "redact", replacement="<X>"),
                       FilterRule(r"\d{3}-\d{4}", "redact", regex=True, max_len=8), FilterRule("boom", "reject")])
    assert f.apply("a SECRETIVE secret 555-1234.") == "a <X> [REDACTED] [REDACTED]."
    with pytest.raises(FilterHit) as e:
        f.apply("fine then Boom and more")
    assert e.value.safe_text == "fine then "
    with pytest.raises(ValueError):
        FilterRule(r"\d+", regex=True)  # a regex needs max_len
    with pytest.raises(ValueError):
        FilterRule("x", "drop")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(20))
def test_stream_filter_matches_whole_and_bounds_holdback(seed):
    rng = random.Random(seed)
    rules = [FilterRule("secret", "redact"), FilterRule("secretive", "redact", replacement="<X>"),
             FilterRule(r"\d{3}-\d{4}", "redact", regex=True, max_len=8)]
    f = ContentFilter(rules)
    words = ["a", "secret", "secretive", "555-1234", "55-12", "sec", "ret", " ", "\n", "é"]
    text = "".join(rng.choice(words) for _ in range(60))
    sf = f.stream()
    out, fed = [], 0
    i = 0
    while i < len(text):
        j = min(len(text), i + rng.randint(1, 7))
        out.append(sf.feed(text[i:j]))
        fed = j
        i = j
        assert len(sf._pending) <= f.span - 1  # hold back less than the longest pattern
    out.append(sf.finish())
    assert fed == len(text) and "".join(out) == f.apply(text)


def test_stream_filter_reject_gives_text_before_match():
    sf = ContentFilter([FilterRule("boom", "reject")]).stream()
    assert sf.feed("all good, b") == "all good"
    with pytest.raises(FilterHit) as e:
        sf.feed("oom!")
    assert e.value.safe_text == ", "


def test_admission_queue_orders_by_priority_and_times_out():
    async def main() -> None:
        adm = Admission(AdmissionConfig(max_concurrency=1, max_queue=2, queue_timeout=0.5))
        await adm.acquire()
        order: list[str] = []

        async def waiter(name: str, prio: int) -> None:
            await adm.acquire(prio)
            order.append(name)

        low = asyncio.create_task(waiter("low", 5))
        await asyncio.sleep(0.01)
        high = asyncio.create_task(waiter("high", -1))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):  # queue full
            await adm.acquire()
        adm.release()
        await asyncio.sleep(0.01)
        assert order == ["high"] and adm.in_flight == 1
        adm.release()
        await asyncio.sleep(0.01)
        assert order == ["high", "low"]
        await asyncio.gather(low, high)
        with pytest.raises(Overloaded):  # waits, then times out
            await adm.acquire()
        adm.release()
        assert adm.in_flight == 0 and adm.waiting == 0
        await adm.acquire()  # free again
        # a cancelled waiter gives nothing away
        t = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0.01)
        t.cancel()
        await asyncio.sleep(0.01)
        adm.release()
        assert adm.in_flight == 0

    asyncio.run(main())


def test_circuit_breaker():
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, cooldown=1.0, max_cooldown=4.0, clock=clock)
    b.failure()
    b.failure()
    b.success()  # resets the count
    b.failure()
    b.failure()
    assert b.state == BreakerState.CLOSED
    b.failure()
    assert b.state == BreakerState.OPEN and not b.allows_requests()
    b.success()  # a probe during the cooldown does not close it
    assert b.state == BreakerState.OPEN
    clock.t += 1.0
    assert b.state == BreakerState.HALF_OPEN and not b.allows_requests()
    b.failure()  # the probe fails: open again, cooldown doubled
    clock.t += 1.5
    assert b.state == BreakerState.OPEN
    clock.t += 0.5
    assert b.state == BreakerState.HALF_OPEN
    b.success()
    assert b.state == BreakerState.CLOSED and b.allows_requests()
    b.trip()  # known gone: open at once
    assert b.state == BreakerState.OPEN and b.num_opened == 3


class R:
    def __init__(self, address: str, pool: str, in_flight: int) -> None:
        from scalellm.protocol.grpc import replica_pb2 as pb

        self.address, self.pool, self.in_flight, self.healthy = address, pool, in_flight, True
        self.load = pb.LoadResponse()


def test_adaptive_pools():
    call = GenerateCall("r", "m", SamplingParams(), prompt="x")
    p = AdaptivePools(threshold=4)
    fast, t1, t2 = R("fast", "latency", 1), R("t1", "throughput", 0), R("t2", "throughput", 1)
    assert p.choose([fast, t1, t2], call) is fast  # 2 in flight < 4: latency pool
    fast.in_flight = 3
    assert p.choose([fast, t1, t2], call) is t1  # 4 in flight: throughput pool, least loaded
    assert p.choose([fast], call) is fast  # the other pool empty: fall back


def test_config_loader(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("team-a:sa\n")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'policy = "adaptive"\n[policy_options]\nthreshold = 8\n[[replicas]]\naddress = "h:1"\n'
                   f'pool = "latency"\n[auth]\napi_key_file = "{keys}"\n[rate_limits.keys.team-a]\n'
                   f'requests_per_min = 5\n[[filters.output]]\npattern = "x"\naction = "redact"\n')
    c = load_config(str(cfg), env={"SCALELLM_API_KEYS": "team-b:sb", "SCALELLM_ADMIN_KEY": "adm"},
                    replicas=["h:2"], port=9000, policy=None)
    assert [r.address for r in c.replicas] == ["h:1", "h:2"] and c.replicas[0].pool == "latency"
    assert c.policy == "adaptive" and c.policy_options == {"threshold": 8} and c.port == 9000
    assert {k.key_id: k.limits.requests_per_min for k in c.safety.keys} == {"team-a": 5, "team-b": 0}
    assert c.admin_key == "adm" and c.safety.output_filters[0].action == "redact"
    cfg.write_text('polcy = "x"\n')
    with pytest.raises(ValueError, match="polcy"):
        load_config(str(cfg), env={})
    cfg.write_text('[rate_limits.keys.ghost]\nrequests_per_min = 1\n')
    with pytest.raises(ValueError, match="ghost"):
        load_config(str(cfg), env={})
    with pytest.raises(ValueError, match="HOST:PORT"):
        load_config(None, env={}, replicas=["nope"])
