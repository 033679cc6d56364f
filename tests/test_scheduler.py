"""Scheduler and KV-cache bookkeeping driven with fabricated model outputs: no weights."""

from __future__ import annotations

import pytest

from scalellm.engine.config import SchedulerConfig
from scalellm.engine.kv_cache_manager import KVCacheManager
from scalellm.engine.request import Request, RequestStatus
from scalellm.engine.scheduler import MIN_BATCH, MIN_PREFILL_TOKENS, Scheduler
from scalellm.engine.step_cost import StepCostModel
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.protocol.step import ModelRunnerOutput, SchedulerOutput

EOS = 2


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=16, max_len=256, caching=True, decode_first=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(budget, max_seqs, max_len, decode_first), kv)


def make_request(rid, prompt_len=10, max_tokens=5, priority=0, arrival=None, tokens=None, **sp):
    ids = tokens if tokens is not None else [100 + (i % 50) for i in range(prompt_len)]
    req = Request(rid, ids, SamplingParams(max_tokens=max_tokens, **sp), frozenset({EOS}), max_tokens, priority)
    if arrival is not None:
        req.arrival_time = arrival
    return req


class FakeWorker:
    """Mimics the worker's contract: samples one token for each request whose scheduled
    tokens reach the end of its known tokens; checks block tables cover the tokens."""

    def __init__(self, sched: Scheduler, token: int = 7) -> None:
        self.sched = sched
        self.token = token
        self.known: dict[str, int] = {}

    def run(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_request_ids:
            self.known.pop(rid, None)
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            req = self.sched.requests[rid]
            blocks = self.sched.kv_cache.block_ids(rid)
            assert len(blocks) * self.sched.kv_cache.block_size >= req.num_computed_tokens + n
            if req.num_computed_tokens + n == req.num_tokens:
                sampled[rid] = self.token
        return ModelRunnerOutput(sampled_token_ids=sampled)

    def step(self):
        out = self.sched.schedule()
        res = self.run(out)
        return out, self.sched.update_from_output(out, res)


def test_chunked_prefill_respects_budget():
    s = make_scheduler(budget=8)
    s.add_request(make_request("a", prompt_len=20, max_tokens=3))
    w = FakeWorker(s)
    chunks = []
    while s.has_unfinished_requests():
        out, _ = w.step()
        assert out.total_num_scheduled_tokens <= 8
        chunks.append(out.num_scheduled_tokens.get("a"))
    # 20 prompt tokens in chunks of 8, 8, 4, then 2 decodes (3 outputs total)
    assert chunks == [8, 8, 4, 1, 1]


def test_decodes_and_prefill_share_a_step():
    s = make_scheduler(budget=16)
    w = FakeWorker(s)
    s.add_request(make_request("a", prompt_len=4, max_tokens=10))
    w.step()  # a prefills
    s.add_request(make_request("b", prompt_len=40, max_tokens=2))
    out, _ = w.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 15}
    out, _ = w.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 15}


def test_max_num_seqs_caps_running():
    s = make_scheduler(max_seqs=2, budget=100)
    for i in range(4):
        s.add_request(make_request(f"r{i}", prompt_len=4))
    out = s.schedule()
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}
    assert s.num_waiting == 2


def test_preemption_and_resume_recomputes():
    # 8 blocks of 4 tokens = 32 slots; two requests of 12 prompt + 12 output tokens cannot both fit.
    s = make_scheduler(num_blocks=8, block_size=4, budget=64, caching=False)
    w = FakeWorker(s)
    s.add_request(make_request("a", prompt_len=12, max_tokens=12, arrival=1.0))
    s.add_request(make_request("b", prompt_len=12, max_tokens=12, arrival=2.0))
    preempted = []
    finished = {}
    for _ in range(200):
        if not s.has_unfinished_requests():
            break
        out, outs = w.step()
        preempted += out.preempted_request_ids
        for o in outs:
            if o.finish_reason:
                finished[o.request_id] = o.finish_reason
        assert s.kv_cache.pool.num_used_blocks <= 8
    assert "b" in preempted  # the later request is the victim
    assert "a" not in preempted
    assert finished == {"a": "length", "b": "length"}
    assert s.num_preemptions >= 1
    assert s.kv_cache.pool.num_used_blocks == 0


def test_preempted_request_is_resent_in_full():
    s = make_scheduler(num_blocks=8, block_size=4, budget=64, caching=False)
    w = FakeWorker(s)
    s.add_request(make_request("a", prompt_len=12, max_tokens=12, arrival=1.0))
    s.add_request(make_request("b", prompt_len=12, max_tokens=12, arrival=2.0))
    resumed = None
    for _ in range(200):
        out, _ = w.step()
        for new in out.new_requests:
            if new.request_id == "b" and len(new.all_token_ids) > 12:
                resumed = new
        if resumed or not s.has_unfinished_requests():
            break
    assert resumed is not None
    assert resumed.num_computed_tokens == 0
    assert resumed.all_token_ids[:12] == s.requests["b"].prompt_token_ids if "b" in s.requests else True


def test_priority_order_and_victim():
    s = make_scheduler(max_seqs=1, budget=100)
    s.add_request(make_request("low", priority=5, arrival=1.0))
    s.add_request(make_request("high", priority=-1, arrival=2.0))
    s.add_request(make_request("mid", priority=0, arrival=0.5))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["high"]
    assert [r.request_id for r in s.waiting] == ["mid", "low"]


def test_lowest_priority_is_preempted_first():
    s = make_scheduler(num_blocks=10, block_size=4, budget=64, caching=False)
    w = FakeWorker(s)
    s.add_request(make_request("p0", prompt_len=12, max_tokens=20, priority=0, arrival=3.0))
    s.add_request(make_request("p9", prompt_len=12, max_tokens=20, priority=9, arrival=1.0))
    s.add_request(make_request("p1", prompt_len=4, max_tokens=20, priority=1, arrival=2.0))
    victims = []
    for _ in range(10):
        out, _ = w.step()
        victims += out.preempted_request_ids
        if victims:
            break
    assert victims[0] == "p9"


def test_abort_frees_blocks_at_once():
    s = make_scheduler()
    w = FakeWorker(s)
    s.add_request(make_request("a", prompt_len=10, max_tokens=50))
    s.add_request(make_request("b", prompt_len=10, max_tokens=50))
    w.step()
    used = s.kv_cache.pool.num_used_blocks
    assert used == 6  # 3 blocks of 4 each for 10 prompt + 1 token
    s.abort_requests(["a"])
    assert s.kv_cache.pool.num_used_blocks == 3
    assert "a" not in s.requests
    out = s.schedule()
    assert "a" in out.finished_request_ids
    assert set(out.num_scheduled_tokens) == {"b"}
    # abort while waiting
    s.add_request(make_request("c", prompt_len=10))
    s.abort_requests(["c"])
    assert s.num_waiting == 0


def test_prefix_cache_hits_and_hit_rate():
    s = make_scheduler(block_size=4, budget=64)
    w = FakeWorker(s)
    shared = list(range(1000, 1012))  # 3 full blocks
    s.add_request(make_request("a", tokens=shared + [5, 6], max_tokens=2))
    while s.has_unfinished_requests():
        w.step()
    s.add_request(make_request("b", tokens=shared + [8, 9, 10], max_tokens=2))
    out = s.schedule()
    assert out.new_requests[0].num_computed_tokens == 12
    assert out.num_scheduled_tokens["b"] == 3
    assert s.kv_cache.stats.num_hit_tokens == 12
    # a full-prompt hit still leaves one token to compute
    s2 = make_scheduler(block_size=4, budget=64)
    w2 = FakeWorker(s2)
    s2.add_request(make_request("a", tokens=shared, max_tokens=2))
    while s2.has_unfinished_requests():
        w2.step()
    s2.add_request(make_request("b", tokens=shared, max_tokens=2))
    out = s2.schedule()
    assert out.new_requests[0].num_computed_tokens == 8
    assert out.num_scheduled_tokens["b"] == 4


def test_prefix_cache_lru_eviction():
    s = make_scheduler(num_blocks=6, block_size=4, budget=64)
    w = FakeWorker(s)
    first = list(range(2000, 2008))
    s.add_request(make_request("a", tokens=first + [1], max_tokens=1))
    while s.has_unfinished_requests():
        w.step()
    assert s.kv_cache.pool.num_cached_blocks == 2
    # a request needing all 6 blocks evicts the cached ones
    s.add_request(make_request("b", tokens=list(range(3000, 3023)), max_tokens=1))
    while s.has_unfinished_requests():
        w.step()
    assert s.kv_cache.pool.num_evictions >= 2
    s.add_request(make_request("c", tokens=first + [1], max_tokens=1))
    out = s.schedule()
    assert out.new_requests[0].num_computed_tokens == 0  # evicted: no hit


def test_block_pool_keeps_to_its_resident_budget():
    """Fresh blocks (untouched memory) are handed out in id order while fewer than the budget
    were ever touched; past it a free block is reused (a cached one evicted, oldest first)
    before a fresh one, and fresh ones are touched only while every touched block is live.
    Without a budget: fresh blocks first, as long as any remain."""
    from scalellm.engine.block_pool import BlockPool

    pool = BlockPool(10, resident_blocks=4)
    a = pool.allocate(3)
    assert [b.block_id for b in a] == [0, 1, 2] and pool.num_free_blocks == 7
    for b, h in zip(a, (b"h0", b"h1", b"h2")):
        pool.cache_block(b, h)
    pool.free(reversed(a))  # tail first: block 2 is the oldest free one
    assert [b.block_id for b in pool.allocate(1)] == [3]  # under the budget: fresh
    got = pool.allocate(2)  # at the budget: the oldest free blocks, their cache entries evicted
    assert [b.block_id for b in got] == [2, 1] and pool.num_evictions == 2
    assert pool.lookup(b"h0") is a[0] and pool.lookup(b"h2") is None
    assert pool.num_touched_blocks == 4
    pool.touch([a[0]])  # a cache hit revives the last cached block: every touched block is live
    more = pool.allocate(3)  # live requests need more: the pool grows past the budget
    assert [b.block_id for b in more] == [4, 5, 6] and pool.num_touched_blocks == 7
    pool.free(more)
    assert [b.block_id for b in pool.allocate(2)] == [4, 5]  # reused, not fresh
    assert pool.num_used_blocks == 6 and pool.num_free_blocks == 4
    with pytest.raises(RuntimeError):
        pool.allocate(5)

    pool.free(pool.blocks[i] for i in (4, 5))
    assert pool.shrink_to_budget() == (4, 7)  # idle: past the budget, down to the highest live block
    assert pool.num_touched_blocks == 4 and pool.num_free_blocks == 6  # blocks 0-3 live, 4-9 fresh
    pool.free([pool.blocks[3]])
    assert [b.block_id for b in pool.allocate(1)] == [3]  # at the budget again: reuse before touching more
    assert pool.shrink_to_budget() is None  # nothing past the budget
    live = pool.allocate(3)
    assert [b.block_id for b in live] == [4, 5, 6]  # every touched block is live: fresh ones
    pool.free(live[:2])
    assert pool.shrink_to_budget() is None  # block 6 is live: 4 and 5 below it stay
    pool.cache_block(live[2], b"h6")
    pool.free(live[2:])
    assert pool.shrink_to_budget() == (4, 7) and pool.lookup(b"h6") is None

    whole = BlockPool(4)
    first = whole.allocate(2)
    whole.free(first)
    assert [b.block_id for b in whole.allocate(3)] == [2, 3, 0]  # fresh first, then the oldest free


def test_shared_blocks_are_ref_counted():
    s = make_scheduler(block_size=4, budget=64)
    w = FakeWorker(s)
    shared = list(range(1000, 1008))
    s.add_request(make_request("a", tokens=shared + [1, 2], max_tokens=30))
    w.step()
    s.add_request(make_request("b", tokens=shared + [3], max_tokens=30))
    w.step()
    a_blocks, b_blocks = s.kv_cache.block_ids("a"), s.kv_cache.block_ids("b")
    assert a_blocks[:2] == b_blocks[:2]
    s.abort_requests(["a"])
    # b still holds the shared blocks
    assert all(s.kv_cache.pool.blocks[i].ref_cnt == 1 for i in b_blocks[:2])


def test_stop_conditions():
    s = make_scheduler()
    w = FakeWorker(s, token=EOS)
    s.add_request(make_request("eos", max_tokens=10))
    s.add_request(make_request("min", max_tokens=10, min_tokens=3))
    s.add_request(make_request("ign", max_tokens=4, ignore_eos=True))
    done = {}
    for _ in range(20):
        _, outs = w.step()
        for o in outs:
            if o.finish_reason:
                done[o.request_id] = (o.finish_reason, s_len(o))
    assert done["eos"][0] == "stop"
    assert done["min"][0] == "stop"
    assert done["ign"][0] == "length"


def s_len(o):
    return len(o.new_token_ids)


def test_stop_token_ids_and_counts():
    s = make_scheduler()
    w = FakeWorker(s, token=9)
    req = make_request("st", max_tokens=10, stop_token_ids=[9], min_tokens=2)
    s.add_request(req)
    reasons = []
    while s.has_unfinished_requests():
        _, outs = w.step()
        reasons += [(o.finish_reason, o.stop_reason) for o in outs if o.finish_reason]
    assert reasons == [("stop", 9)]
    assert req.num_output_tokens == 2
    assert req.status == RequestStatus.FINISHED_STOPPED


def exact_cost_model(a_ms: float, b_ms: float, c_ms: float) -> StepCostModel:
    """A cost model fitted (without a prior) to steps of a known cost a + b*decodes + c*prefill."""
    m = StepCostModel(ridge=0.0)
    for d, p in [(1, 0), (8, 0), (16, 32), (4, 100), (32, 7)]:
        m.observe(d, p, (a_ms + b_ms * d + c_ms * p) / 1e3)
    return m


def test_target_step_ms_caps_steps_with_decodes_by_measured_cost():
    kv = KVCacheManager(256, 4, False)  # no prefix hits: the counts below are all computed
    s = Scheduler(SchedulerConfig(512, 64, 256, target_step_ms=100.0), kv)
    w = FakeWorker(s)
    for i in range(8):
        s.add_request(make_request(f"d{i}", prompt_len=6, max_tokens=50))
    out, _ = w.step()  # no cost known yet: the full budget
    assert out.total_num_scheduled_tokens == 48
    s.step_cost = exact_cost_model(20.0, 2.0, 1.0)  # 8 decodes: 36 ms; 64 prefill tokens fit
    for i in range(4):
        s.add_request(make_request(f"p{i}", prompt_len=100, max_tokens=5))
    out, _ = w.step()
    assert sum(n for r, n in out.num_scheduled_tokens.items() if r.startswith("d")) == 8
    assert out.total_num_scheduled_tokens == 8 + 64
    s.step_cost = exact_cost_model(20.0, 2.0, 3.0)  # prefill dearer: (100 - 20 - 16) / 3 = 21 tokens
    out, _ = w.step()
    assert out.total_num_scheduled_tokens == 8 + 21


def test_target_step_ms_keeps_a_prefill_floor_when_decodes_fill_the_step():
    kv = KVCacheManager(1024, 4, False)
    s = Scheduler(SchedulerConfig(512, 64, 256, target_step_ms=100.0), kv)
    w = FakeWorker(s)
    for i in range(24):
        s.add_request(make_request(f"d{i}", prompt_len=4, max_tokens=50))
    w.step()  # 24 decoding from now on
    s.step_cost = exact_cost_model(20.0, 3.5, 3.0)  # 24 decodes: 104 ms, over the target
    s.add_request(make_request("late", prompt_len=100, max_tokens=5))
    s.waiting[0].status = RequestStatus.RUNNING  # as if admitted earlier, mid-prefill
    s.running.append(s.waiting.pop(0))
    out, _ = w.step()
    assert out.num_scheduled_tokens["late"] == MIN_PREFILL_TOKENS  # prefills still progress


def test_target_step_ms_leaves_prefill_only_steps_at_full_budget():
    kv = KVCacheManager(256, 4, True)
    s = Scheduler(SchedulerConfig(64, 64, 256, target_step_ms=10.0), kv)
    s.step_cost = exact_cost_model(5.0, 1.0, 1.0)  # far over the target
    s.add_request(make_request("a", prompt_len=200, max_tokens=2))
    out = s.schedule()
    assert out.total_num_scheduled_tokens == 64  # nobody is decoding: no cap


def burst_of_30(target_ms: float) -> tuple[Scheduler, FakeWorker]:
    """30 short requests waiting on a scheduler whose steps cost 10 ms + 2 ms per decode
    + 0.1 ms per prefill token."""
    s = Scheduler(SchedulerConfig(512, 64, 256, target_step_ms=target_ms), KVCacheManager(1024, 4, False))
    s.step_cost = exact_cost_model(10.0, 2.0, 0.1)
    for i in range(30):
        s.add_request(make_request(f"r{i}", prompt_len=4, max_tokens=100))
    return s, FakeWorker(s)


def test_target_step_ms_admits_only_what_keeps_steps_within_target():
    s, w = burst_of_30(50.0)  # n decodes + an 8-token slice fit 50 ms for n <= 19
    out, _ = w.step()
    assert MIN_PREFILL_TOKENS == 8
    assert len(out.num_scheduled_tokens) == 19 and s.num_waiting == 11
    for _ in range(5):
        out, _ = w.step()  # 19 decodes each: nobody else starts
        assert len(out.num_scheduled_tokens) == 19 and s.num_waiting == 11
    s.abort_requests(["r0", "r1"])  # two leave: two start
    out, _ = w.step()
    assert len(out.num_scheduled_tokens) == 19 and s.num_waiting == 9
    assert {"r19", "r20"} <= set(out.num_scheduled_tokens)


def test_target_step_ms_never_asks_for_batches_below_min_batch():
    # 16 decodes + a slice take 42.8 ms > 30: the target cannot be met by a useful batch;
    # holding to it would run tiny steps, dropping it whole-budget ones: aim at 42.8 ms
    s, w = burst_of_30(30.0)
    out, _ = w.step()
    assert MIN_BATCH == 16
    assert len(out.num_scheduled_tokens) == MIN_BATCH and s.num_waiting == 30 - MIN_BATCH
    out, _ = w.step()  # 16 decodes (42 ms) and nobody else starts
    assert out.total_num_scheduled_tokens == MIN_BATCH and s.num_waiting == 30 - MIN_BATCH


def test_step_cost_model_fits_steps_and_errs_on_the_safe_side():
    truth = (0.046, 0.0025, 0.0017)  # SmolLM2 int8 on 2 cores: per step, per decode row, per prefill token
    m = StepCostModel()
    for i in range(60):
        d, p = 8 + (i * 7) % 57, (0, 32, 128)[i % 3]
        m.observe(d, p, truth[0] + truth[1] * d + truth[2] * p)
    a, b, c = m.coefficients
    for d, p in [(1, 0), (32, 32), (64, 0), (20, 128)]:
        exact = truth[0] + truth[1] * d + truth[2] * p
        assert abs(m.predict(d, p) - exact) < 0.05 * exact
    # steps of one size cannot split the fixed cost from the per-row one: the prior puts it
    # on the rows, so a larger batch is predicted no cheaper than it is
    m = StepCostModel()
    for _ in range(30):
        m.observe(30, 0, truth[0] + truth[1] * 30)
    assert m.predict(30, 0) == pytest.approx(truth[0] + truth[1] * 30, rel=0.05)
    assert m.predict(40, 0) >= truth[0] + truth[1] * 40
    # decode-only steps say nothing of prefill: a prefill token is priced as a row
    _, b, c = m.coefficients
    assert c == pytest.approx(b, rel=0.05)
    assert m.max_prefill_tokens(m.predict(30, 0) + 10 * b, 30) in (9, 10)


def test_step_cost_model_remembers_prefill_cost_through_decode_only_steps():
    # CPU-like: a prefill token ~3x cheaper than a decode row. A burst's mixed steps, then the
    # hundreds of decode-only steps of its decode phase: when the next burst comes, the model
    # must still price prefill tokens from the burst, not as rows (the prior's guess)
    a, b, c = 0.020, 0.0006, 0.0002
    m = StepCostModel()
    for i in range(12):
        d, p = 16 + 4 * i, 600 - 20 * i
        m.observe(d, p, a + b * d + c * p)
    for _ in range(300):
        m.observe(64, 0, a + b * 64)
    _, _, c_fit = m.coefficients
    assert c_fit == pytest.approx(c, rel=0.15)
    assert m.predict(64, 0) == pytest.approx(a + b * 64, rel=0.02)
    target = 0.150
    room = m.max_prefill_tokens(target, 48)
    assert abs(room - (target - a - b * 48) / c) < 0.15 * (target - a - b * 48) / c
    # the machine slows down (decode steps 30% dearer): the recent steps move the prediction
    for _ in range(40):
        m.observe(64, 0, 1.3 * (a + b * 64))
    assert m.predict(64, 0) == pytest.approx(1.3 * (a + b * 64), rel=0.05)


def test_target_ttft_ms_yields_the_step_goal_for_a_burst_it_cannot_serve_in_time():
    import time

    def setup(ttft_ms, burst):
        kv = KVCacheManager(1024, 4, False)
        s = Scheduler(SchedulerConfig(512, 256, 256, target_step_ms=100.0, target_ttft_ms=ttft_ms), kv)
        w = FakeWorker(s)
        for i in range(8):
            s.add_request(make_request(f"d{i}", prompt_len=6, max_tokens=50))
        w.step()  # 8 decoding from now on
        # 8 decodes: 36 ms; capped steps carry (100 - 20 - 16) / 1 = 64 prefill tokens a step,
        # 640 tokens a second
        s.step_cost = exact_cost_model(20.0, 2.0, 1.0)
        for i in range(burst):
            s.add_request(make_request(f"p{i}", prompt_len=100, max_tokens=5))
        return s, w

    # two 100-token prompts: 0.31 s at the capped rate, within a 1 s goal: capped
    s, w = setup(1000.0, 2)
    out, _ = w.step()
    assert out.total_num_scheduled_tokens == 8 + 64
    # ten: the last first token 1.6 s out at the capped rate: the goal yields (the full
    # budget for the prompts, the decodes on top; everyone admitted); the steps that took it
    # are not fitted
    s, w = setup(1000.0, 10)
    fitted = s.step_cost.coefficients
    out, _ = w.step()
    assert out.total_num_scheduled_tokens == 8 + 512
    assert s.step_cost.coefficients == fitted
    # and once what is left fits in time, steps are capped again
    while s.first_token_at_risk():
        w.step()
    out, _ = w.step()
    assert out.total_num_scheduled_tokens <= 8 + 10 + 64
    # without a TTFT goal the same burst only ever gets capped steps
    s, w = setup(None, 10)
    out, _ = w.step()
    assert out.total_num_scheduled_tokens == 8 + 64
    # a request that has waited past the goal already: yields at once, even alone
    s, w = setup(1000.0, 1)
    s.waiting[0].arrival_time = time.monotonic() - 2.0
    assert s.first_token_at_risk()
    out, _ = w.step()
    assert out.num_scheduled_tokens["p0"] == 100


def test_target_ttft_ms_admits_while_the_kv_cache_has_headroom():
    # yielding skips the decode-cost gate (a c=64 run once stalled at ~16 streams behind it) but
    # not the KV cache: letting everyone in under sustained overload filled it and preempted
    # streams for seconds
    def setup(num_blocks):
        kv = KVCacheManager(num_blocks, 4, False)
        s = Scheduler(SchedulerConfig(512, 256, 256, target_step_ms=100.0, target_ttft_ms=1000.0), kv)
        w = FakeWorker(s)
        for i in range(40):
            s.add_request(make_request(f"d{i}", prompt_len=6, max_tokens=50))
        w.step()  # 40 decoding, 80 blocks
        s.step_cost = exact_cost_model(20.0, 2.0, 1.0)  # one more decode: 20 + 82 + 8 = 110 ms > 100
        for i in range(10):
            s.add_request(make_request(f"p{i}", prompt_len=100, max_tokens=5))
        assert s.first_token_at_risk()
        return w
    out, _ = setup(4096).step()  # plenty of room: admitted despite the cost gate, the whole budget
    assert sum(n for r, n in out.num_scheduled_tokens.items() if r.startswith("p")) == 512
    out, _ = setup(88).step()  # 80 of 88 blocks in use (91%): nobody else starts
    assert not any(r.startswith("p") for r in out.num_scheduled_tokens)
