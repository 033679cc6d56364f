"""The engine core: schedule -> execute -> update, over token ids only.

It owns the scheduler and a model executor (the in-process ModelRunner, or the
tensor-parallel MultiprocExecutor). No text, no tokenizer: those belong to the
frontend. The server runs it in its own process (server/core_process.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from scalellm.engine.request import Request
from scalellm.engine.scheduler import Scheduler
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.protocol.step import CoreRequest, EngineCoreOutput, ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

# idle seconds (since the engine was built or last ran a step) before the warm-up step runs
WARM_UP_GRACE_S = float(os.environ.get("SCALELLM_WARM_UP_GRACE_S", "1.0"))


class Executor(Protocol):
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...

    def kernels_ready(self) -> bool:
        """Whether the kernels a step uses are compiled (CPU kernels compile in the background)."""
        ...

    def drop_start_up_pages(self) -> int:
        """Before the warm-up step: drop resident pages only start-up used (returns bytes)."""
        ...

    def prefault_kv(self, max_blocks: int = 8, upto: int | None = None) -> bool:
        """Idle time only: fault in the next KV blocks' pages (below block `upto`); returns
        whether any remain."""
        ...

    def release_kv(self, lo: int, hi: int) -> int:
        """Idle time only: hand back the memory of KV blocks [lo, hi) (their contents are
        lost); returns the bytes released."""
        ...

    def read_expert_load(self) -> dict[int, list[int]]:
        """MoE: tokens per expert per layer since the last read ({} for dense models)."""
        ...

    def check_health(self) -> None:
        """Raise if a part of the executor (a worker rank) died; cheap, called when idle."""
        ...

    def shutdown(self) -> None: ...


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_steps: int
    num_tokens_scheduled: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.num_steps = 0
        self.num_tokens_scheduled = 0
        self.schedule_seconds = 0.0  # cumulative, for the phase profile (see protocol.ipc.CORE_PHASES)
        self.update_seconds = 0.0
        self.warmed_up = False  # the full-budget warm-up step has run (idle_work)
        # a step ran before the CPU kernels were ready: the prefix cache holds K/V the torch
        # stand-ins computed, which the warm-up step drops (see warm_up_step)
        self.stand_in_steps = 0
        self.last_busy = time.monotonic()  # when the engine was built or last ran a step

    def add_request(self, request: Request, seed_offset: int = 0) -> None:
        self.scheduler.add_request(request, seed_offset)

    def add_core_request(self, req: CoreRequest) -> None:
        request = Request(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling_params=req.sampling_params,
            eos_token_ids=frozenset(req.eos_token_ids),
            max_output_tokens=req.max_output_tokens,
            priority=req.priority,
            arrival_time=req.arrival_time,
        )
        self.scheduler.add_request(request, req.seed_offset)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        ts = time.perf_counter()
        sched = self.scheduler.schedule()
        t0 = time.perf_counter()
        self.schedule_seconds += t0 - ts
        if sched.is_empty:
            if sched.finished_request_ids:
                self.executor.execute(sched)  # let the worker drop finished state
            return []
        if not self.warmed_up and not self.executor.kernels_ready():
            self.stand_in_steps += 1
        result = self.executor.execute(sched)
        t1 = time.perf_counter()
        self.scheduler.observe_step(sched, t1 - t0)
        if logger.isEnabledFor(logging.DEBUG):  # one line a step: its shape, its time, the queue
            num_decodes, num_prefill = self.scheduler.step_shape(sched)
            logger.debug("step %d: %d decodes + %d prefill tokens in %.1f ms; %d running, %d waiting",
                         self.num_steps, num_decodes, num_prefill, (t1 - t0) * 1e3,
                         self.scheduler.num_running, self.scheduler.num_waiting)
        outputs = self.scheduler.update_from_output(sched, result)
        self.update_seconds += time.perf_counter() - t1
        self.last_busy = time.monotonic()
        self.num_steps += 1
        self.num_tokens_scheduled += sched.total_num_scheduled_tokens
        return outputs

    def idle_work(self) -> bool | None:
        """A slice of work for an idle engine: once the step's kernels are compiled and the
        engine has been idle for WARM_UP_GRACE_S, one warm-up step of a full token budget
        (`warm_up_step`, 0.6-2.3 s on 2 CPU cores the first time); else faulting in the next
        KV-cache pages (ModelRunner.prefault_kv, ~10 ms). Returns True when more remains now,
        None when more remains later (the kernels are still compiling, or the grace period
        runs), False when all is done.

        NOTE: the grace period is for the clients that wait for /ready and then send at once:
        a step cannot be interrupted, and a request that came during the warm-up step waited it
        out (the first answer after /ready took 1.8-2.3 s served, ~0.3 s later on). A burst
        that comes before the warm-up now runs its first full step cold (~0.4 s more than a
        warm one in process) instead of waiting for the whole warm-up step."""
        if not self.warmed_up and self.executor.kernels_ready() \
                and time.monotonic() - self.last_busy >= WARM_UP_GRACE_S:
            self.warm_up_step()
            return True
        if self.executor.prefault_kv(upto=self.scheduler.kv_cache.pool.resident_blocks):
            return True
        return False if self.warmed_up else None

    def release_idle_kv(self) -> int:
        """Idle time only: hand back the KV memory that live requests took past the block
        pool's resident budget (BlockPool.shrink_to_budget); returns the bytes released."""
        span = self.scheduler.kv_cache.pool.shrink_to_budget()
        return self.executor.release_kv(*span) if span is not None else 0

    def warm_up_step(self) -> None:
        """Run dummy prompts that fill one step's token budget (128-token prompts, one
        output token each), outside the prefix cache (no lookups, nothing published, so
        what is cached stays), then forget them: the step counters are left as they were.

        NOTE: the first step of a new size allocates its activations (and oneDNN its
        primitives) for the first time, and on these VMs a fresh page can cost 10-300 us
        to fault in: in a same-run comparison with vLLM starting beside it, the first
        2,048-token step of a c=64 burst took ~1 s more than the next ones, adding that to
        every TTFT of the burst. Afterwards the heap keeps those pages
        (memory.keep_freed_heap, set in the engine core process).

        If steps ran before the kernels were ready (a cold numba cache: the torch stand-ins
        served them), the prefix cache is emptied first: its blocks hold the stand-ins' K/V,
        and a repeated prompt would go on continuing from them (after a cold int8 start, the
        stand-ins' first tokens kept coming back once the kernels were in)."""
        self.warmed_up = True
        if self.stand_in_steps:
            self.scheduler.kv_cache.reset_prefix_cache()
            logger.info("kernels ready after %d steps on the torch stand-ins: prefix cache emptied",
                        self.stand_in_steps)
        self.executor.drop_start_up_pages()
        kv = self.scheduler.kv_cache
        counters = (self.num_steps, self.num_tokens_scheduled, self.schedule_seconds, self.update_seconds,
                    self.scheduler.num_preemptions)
        caching, kv.enable_prefix_caching = kv.enable_prefix_caching, False
        cfg = self.scheduler.config
        prompt_len = max(1, min(128, cfg.max_model_len - 1, cfg.max_num_batched_tokens))
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for i in range(max(1, cfg.max_num_batched_tokens // prompt_len)):
            ids = [(i + j) % 8 for j in range(prompt_len)]  # token ids below 8 exist in every vocabulary
            self.scheduler.add_request(Request(f"__warm_up_{i}", ids, params, frozenset(), 1))
        t0 = time.perf_counter()
        try:
            while self.scheduler.has_unfinished_requests():
                self.step()
            logger.info("warm-up step: %d tokens in %.0f ms", cfg.max_num_batched_tokens,
                        (time.perf_counter() - t0) * 1e3)
        finally:
            kv.enable_prefix_caching = caching
            (self.num_steps, self.num_tokens_scheduled, self.schedule_seconds, self.update_seconds,
             self.scheduler.num_preemptions) = counters

    def read_expert_load(self) -> dict[int, list[int]]:
        return self.executor.read_expert_load()

    def check_health(self) -> None:
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()

    def stats(self) -> EngineStats:
        kv = self.scheduler.kv_cache
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_kv_blocks_used=kv.pool.num_used_blocks,
            num_kv_blocks_total=kv.pool.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.stats.num_queried_tokens,
            prefix_cache_hits=kv.stats.num_hit_tokens,
            num_steps=self.num_steps,
            num_tokens_scheduled=self.num_tokens_scheduled,
        )
