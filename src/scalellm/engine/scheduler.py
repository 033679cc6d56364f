"""The token-budget scheduler: continuous batching with chunked prefill and preemption.

There is no prefill or decode phase. Every request has `num_computed_tokens` and a
target `num_tokens` (prompt + outputs so far); each step hands out a budget of
`max_num_batched_tokens` tokens and at most `max_num_seqs` running requests:

1. Running requests first (decodes before unfinished prefills when `decode_first`,
   then by priority and arrival). Each gets min(remaining, budget) tokens. If the
   KV pool cannot supply blocks, the lowest-priority, latest-arrived running request
   is preempted (blocks freed, recomputed later) until the allocation fits.
2. Then waiting requests in (priority, arrival) order, after prefix-cache lookup,
   as long as budget, sequence slots and blocks last. A prompt longer than the
   remaining budget is prefilled in chunks over several steps.

With `target_step_ms` (an inter-token latency goal), a cost model fitted to the measured
steps (`step_cost`, fed by `observe_step`) decides two things:
- the budget of a step that carries decodes: what the model says fits the target, never
  below the decodes plus `MIN_PREFILL_TOKENS` (decodes keep flowing at the target's pace
  while prefills still progress). Steps with no decodes use the full budget: nobody waits
  on them for a token;
- admission: a waiting request starts only while a step with one more decode (and a
  `MIN_PREFILL_TOKENS` slice) is predicted to fit the target. Running requests are
  never cut to meet it, so a burst queues instead of slowing every stream down.
With `target_ttft_ms` as well (a time-to-first-token goal), the step goal yields while a
request awaiting its first token would miss that goal were the prompts ahead of it and its
own prefilled at the capped steps' rate: full-budget steps until the rest fits in time. A
burst that capped steps cannot prefill in time (a c=64 burst of 128-token prompts on 2 CPU
cores: ~40 capped steps, TTFT p99 ~3.8 s) is cleared in a few full steps instead; each
stalls the running streams once, so fewer and larger steps cost the fewest long token
intervals. In those steps the prompts get the whole budget and the decodes come on top (a
c=64 burst of 8,192 prompt tokens: 4,096, then 32 decodes + 4,096, where counting the
decodes in the budget left the last prompt's 32 tokens to a third step). While yielding,
admission skips the decode-cost gate (with it, one c=64 run held at ~16 streams and 462
tok/s; the cause was not pinned down) but stops at `TTFT_YIELD_KV_HEADROOM` free KV:
letting everyone in under sustained overload (1,024-token prompts at 3 req/s) filled the
cache, and preemptions stalled streams for up to 5 s.
The target never asks for batches below `MIN_BATCH` decodes: where even that many (and a
slice) take longer than the target (a model or precision too slow for it, or a machine
slowed down), the step aims at that batch's time instead. Continuous in the estimates, so
a noisy fit moves steps a little, not between regimes; ignoring the target would bring
back whole-budget prefill steps, holding to it would starve throughput and TTFT behind
tiny steps.

Knows nothing of tensors or text. Stop strings are the frontend's: it aborts.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable

from scalellm.engine.config import SchedulerConfig
from scalellm.engine.kv_cache_manager import KVCacheManager
from scalellm.engine.request import Request, RequestStatus
from scalellm.engine.step_cost import StepCostModel
from scalellm.protocol.step import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)


# Prefill tokens a capped step still takes when prefills wait (progress for newcomers), and
# the slice admission reserves for a newcomer. Small: on CPU a prefill token in a small chunk
# costs about as much as a decode row, so every reserved token is a decode stream fewer.
MIN_PREFILL_TOKENS = 8
MIN_BATCH = 16  # decodes a step may always carry, whatever the target says
# While the TTFT goal makes the step goal yield, waiting requests start while the KV cache
# has this much of itself free: their decodes grow into it instead of preempting others.
TTFT_YIELD_KV_HEADROOM = 0.10


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.running: list[Request] = []
        self._finished_ids: list[str] = []  # to tell the worker next step
        self._seen_by_worker: set[str] = set()  # holds blocks the worker knows of
        self._known_by_worker: set[str] = set()  # has worker state (kept across preemption)
        self.num_preemptions = 0
        self.seed_offsets: dict[str, int] = {}
        self.step_cost = StepCostModel()  # measured steps -> predicted step time, for target_step_ms
        self._ttft_yield = False  # this step: a first token would miss target_ttft_ms, the step goal yields

    # -- intake ------------------------------------------------------------------
    def add_request(self, request: Request, seed_offset: int = 0) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.seed_offsets[request.request_id] = seed_offset
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        keys = [r.sort_key() for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, request.sort_key()), request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Abort at any point; blocks come back at once. Unknown ids are ignored."""
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            aborted.append(request)
        return aborted

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv_cache.free(request)
        del self.requests[request.request_id]
        self.seed_offsets.pop(request.request_id, None)
        self._seen_by_worker.discard(request.request_id)
        if request.request_id in self._known_by_worker:
            self._known_by_worker.discard(request.request_id)
            self._finished_ids.append(request.request_id)

    # -- queries -----------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- step cost ---------------------------------------------------------------
    def step_shape(self, sched: SchedulerOutput) -> tuple[int, int]:
        """(decodes, prefill tokens) of the step `sched`, before `update_from_output`."""
        num_decodes = num_prefill = 0
        for request_id, n in sched.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if n == 1 and (request is None or request.num_tokens - request.num_computed_tokens == 1):
                num_decodes += 1
            else:
                num_prefill += n
        return num_decodes, num_prefill

    def observe_step(self, sched: SchedulerOutput, seconds: float) -> None:
        """The executor's time for the step `sched` (call before `update_from_output`).

        Only steps the goal could shape are fitted: not those without decodes nor those where
        the TTFT goal made it yield, which take the full budget whatever the model says.
        Their 2-4k-token prefill runs the linears at a far better rate than a capped step's
        few hundred rows and taught the model a prefill token ~35% too cheap: the next
        capped steps overran the target by 60-80%."""
        num_decodes, num_prefill = self.step_shape(sched)
        if num_decodes and not self._ttft_yield:
            self.step_cost.observe(num_decodes, num_prefill, seconds)

    def target_seconds(self) -> float | None:
        """The step time aimed at: target_step_ms, or the time of MIN_BATCH decodes and a
        slice where that is longer; None without a target or before a step is measured."""
        target = self.config.target_step_ms
        if target is None or not self.step_cost.is_fitted:
            return None
        return max(target / 1000.0, self.step_cost.predict(MIN_BATCH, MIN_PREFILL_TOKENS))

    def _num_decoding(self) -> int:
        """Running requests whose next step is a decode (one token left to compute)."""
        return sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)

    def first_token_at_risk(self) -> bool:
        """Would a request awaiting its first token get it later than target_ttft_ms after its
        arrival, were the prompts still to compute prefilled in scheduling order (running
        ones, then the queue's) at the capped steps' rate? (False without both goals or
        before a step is measured.)"""
        limit = self.config.target_ttft_ms
        target = self.target_seconds() if limit is not None else None
        if target is None:
            return False
        pending = [r for r in self.running if r.first_token_time is None]
        pending += [r for r in self.waiting if r.first_token_time is None]
        if not pending:
            return False
        room = max(self.step_cost.max_prefill_tokens(target, self._num_decoding()), MIN_PREFILL_TOKENS)
        rate = room / target  # prefill tokens a second at the capped steps' pace
        now = time.monotonic()
        tokens = 0
        for r in pending:
            tokens += r.num_tokens - r.num_computed_tokens
            if now + tokens / rate > r.arrival_time + limit / 1000.0:
                return True
        return False

    def step_budget(self) -> int:
        """This step's token budget (see the module docstring)."""
        full = self.config.max_num_batched_tokens
        target = self.target_seconds()
        if target is None:
            return full
        decoding = self._num_decoding()
        if self._ttft_yield:
            return full + decoding  # the prompts get the whole budget
        if decoding == 0:
            return full
        prefill = self.step_cost.max_prefill_tokens(target, decoding)
        return min(full, decoding + max(prefill, MIN_PREFILL_TOKENS))

    def admission_open(self) -> bool:
        """May one more waiting request start (see the module docstring)?"""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        target = self.target_seconds()
        if target is None:
            return True
        if self._ttft_yield:  # the TTFT goal's steps: as many as the KV cache holds with headroom
            return self.kv_cache.usage < 1.0 - TTFT_YIELD_KV_HEADROOM
        return self.step_cost.predict(len(self.running) + 1, MIN_PREFILL_TOKENS) <= target

    # -- one step ----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._ttft_yield = self.first_token_at_risk()
        budget = step_budget = self.step_budget()
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: list[str] = []
        now = time.monotonic()

        def remaining(r: Request) -> int:
            return r.num_tokens - r.num_computed_tokens

        order = sorted(
            self.running,
            key=lambda r: ((remaining(r) > 1) if self.config.decode_first else False, *r.sort_key()),
        )
        for request in order:
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(remaining(request), budget)
            old_num_blocks = self.kv_cache.num_blocks(request.request_id)
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self._pick_victim(exclude=num_scheduled) or request
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            if request.request_id in self._seen_by_worker:
                new_blocks = self.kv_cache.block_ids(request.request_id, start=old_num_blocks)
                cached_reqs.append(CachedRequestData(request.request_id, new_blocks, request.num_computed_tokens))
            else:
                new_reqs.append(self._new_request_data(request, self.kv_cache.block_ids(request.request_id)))

        # Waiting requests only when nothing was preempted: they would take the blocks back.
        while self.waiting and budget > 0 and not preempted and self.admission_open():
            request = self.waiting[0]
            hits, num_hit_tokens = ([], 0)
            if request.num_computed_tokens == 0:
                hits, num_hit_tokens = self.kv_cache.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            if not self.kv_cache.allocate_slots(request, num_new, hits):
                break
            self.waiting.pop(0)
            request.num_computed_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                request.num_cached_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            new_reqs.append(self._new_request_data(request, self.kv_cache.block_ids(request.request_id)))

        for data in new_reqs:
            self._seen_by_worker.add(data.request_id)
            self._known_by_worker.add(data.request_id)
        out = SchedulerOutput(
            new_requests=new_reqs,
            cached_requests=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=step_budget - budget,
            finished_request_ids=self._finished_ids,
            preempted_request_ids=preempted,
        )
        self._finished_ids = []
        return out

    def _new_request_data(self, request: Request, block_ids: list[int]) -> NewRequestData:
        return NewRequestData(
            request_id=request.request_id,
            all_token_ids=list(request.all_token_ids),
            num_prompt_tokens=request.num_prompt_tokens,
            sampling_params=request.sampling_params,
            block_ids=block_ids,
            num_computed_tokens=request.num_computed_tokens,
            eos_token_ids=request.eos_token_ids,
            seed_offset=self.seed_offsets.get(request.request_id, 0),
        )

    def _pick_victim(self, exclude: dict[str, int]) -> Request | None:
        """The lowest-priority, latest running request not yet scheduled this step."""
        candidates = [r for r in self.running if r.request_id not in exclude]
        return max(candidates, key=Request.sort_key) if candidates else None

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        # NOTE: the worker keeps this request's sampling state (seeded generator, output
        # tokens); it is re-sent in full as NewRequestData when it resumes.
        self._seen_by_worker.discard(request.request_id)
        self._enqueue(request)

    # -- after the step ------------------------------------------------------------
    def update_from_output(
        self, sched: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        now = time.monotonic()
        for request_id, num_tokens in sched.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += num_tokens
            self.kv_cache.cache_computed_blocks(request)
            token_id = result.sampled_token_ids.get(request_id)
            if token_id is None:
                continue  # a prefill chunk short of the end
            request.append_token(token_id)
            first = request.first_token_time is None
            if first:
                request.first_token_time = now
            lp = result.logprobs.get(request_id)  # passed through; the frontend keeps them
            status = self._check_stop(request, token_id)
            out = EngineCoreOutput(
                request_id=request_id,
                new_token_ids=[token_id],
                new_logprobs=[lp] if lp is not None else None,
                num_cached_tokens=request.num_cached_tokens,
                num_preemptions=request.num_preemptions,
            )
            if first:
                out.first_scheduled_time = request.first_scheduled_time
                out.first_token_time = now
            if status is not None:
                self._finish(request, status)
                out.finish_reason = str(status.finish_reason())
                out.stop_reason = request.stop_reason
            outputs.append(out)
        return outputs

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
