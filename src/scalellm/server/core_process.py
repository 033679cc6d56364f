"""The engine-core process: owns the model, the KV cache and the scheduler, and runs
the busy loop (drain inputs -> step -> send outputs) where request I/O cannot stall it.

Death is loud: an unhandled error is logged, reported to the frontend and the process
exits non-zero; if the frontend dies, the core notices its parent is gone and exits.
With tensor parallelism this process is rank 0: it checks the worker ranks at every
idle poll (and the executor before every step), so a dead rank fails the core too.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import time

import zmq

from scalellm.engine.config import EngineConfig
from scalellm.memory import keep_freed_heap, trim_heap
from scalellm.protocol import ipc

logger = logging.getLogger("scalellm.core")

IDLE_POLL_MS = 100
# NOTE: an idle engine steps as soon as the first request of a burst is in; the burst's
# rest (a c=64 wave reaches the core over up to ~0.1 s: HTTP, gRPC, tokenizing) arrives
# during that step. Gathering the burst first (a 2 ms gap, 30 ms cap) was tried: the window
# caught ~57 of 64, and the stragglers' prefill then stalled 57 streams for 150-260 ms
# (served c=64 ITL p99 138-223 ms against 94).
EXPERT_LOAD_INTERVAL_S = 1.0
# Seconds without a step (its idle work done) after which the core hands back, once per
# idle spell, the KV memory a peak of live requests took past the block pool's resident
# budget (EngineCore.release_idle_kv) and its heap's free pages (memory.trim_heap): the
# steps' freed activations, which keep_freed_heap keeps for reuse while serving.
# NOTE: on the 2-core Zen 4 VM, SmolLM2: -92 MiB after the warm-up step; the next burst
# faults them in again, ~0.8 ms per MiB (4 KiB pages), spread over its first steps.
# SCALELLM_NO_IDLE_TRIM=1: never.
IDLE_TRIM_S = 5.0


class _Phases:
    """The core process's own time per phase (ipc, idle); the rest comes from the engine
    core (schedule, update) and the model runner (prepare, forward, sample)."""

    __slots__ = ("ipc", "idle")

    def __init__(self) -> None:
        self.ipc = 0.0
        self.idle = 0.0

    def seconds(self, core) -> list[float]:  # type: ignore[no-untyped-def]
        tm = getattr(core.executor, "timings", None)
        prepare, forward, sample = (tm.prepare, tm.forward, tm.sample) if tm is not None else (0.0, 0.0, 0.0)
        return [core.schedule_seconds, prepare, forward, sample, core.update_seconds, self.ipc, self.idle]


_PHASES = _Phases()


def _load(core) -> ipc.EngineLoad:  # type: ignore[no-untyped-def]
    s = core.stats()
    sched = core.scheduler
    in_flight = sum(r.num_tokens for r in sched.running)
    coef = sched.step_cost.coefficients
    target = sched.target_seconds()
    return ipc.EngineLoad(s.num_running, s.num_waiting, s.num_kv_blocks_used, s.num_kv_blocks_total,
                          s.num_preemptions, s.prefix_cache_queries, s.prefix_cache_hits, s.num_steps, in_flight,
                          _PHASES.seconds(core), [c * 1e3 for c in coef] if coef else [],
                          target * 1e3 if target is not None else 0.0)


def run_engine_core_process(config: EngineConfig, input_addr: str, output_addr: str, log_level: str = "WARNING") -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    logger.info("engine core process started")
    keep_freed_heap()  # every step allocates the same activations again: keep their pages
    parent = os.getppid()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(input_addr)
    push = ctx.socket(zmq.PUSH)
    push.connect(output_addr)
    core = None
    try:
        from scalellm.engine.builder import build_engine_core, resolve_model_info

        # token ids only here: each request brings its EOS ids, the frontend holds the tokenizer
        core = build_engine_core(config, resolve_model_info(config, with_tokenizer=False))
        push.send(ipc.encode(ipc.CoreReady(_load(core))))
        _busy_loop(core, pull, push, parent)
    except Exception as e:  # noqa: BLE001 - report anything, then die loudly
        logger.exception("engine core failed")
        try:
            push.send(ipc.encode(ipc.CoreFailed(f"{type(e).__name__}: {e}")), flags=zmq.NOBLOCK)
            time.sleep(0.1)
        finally:
            sys.exit(1)
    finally:
        if core is not None:
            core.shutdown()  # worker ranks, if any
        push.close(linger=500)
        pull.close(linger=0)
        ctx.term()


def main() -> None:
    """Entry of `python -c` (CoreClient.spawn): the arguments of `run_engine_core_process`
    arrive pickled on stdin."""
    args = pickle.load(sys.stdin.buffer)
    run_engine_core_process(*args)


class _ExpertLoadReport:
    """Reads the MoE expert counters (resetting them) at most every EXPERT_LOAD_INTERVAL_S,
    and when the engine goes idle, so the frontend's totals are never stale for long."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def take(self, core, idle: bool) -> dict[int, list[int]] | None:  # type: ignore[no-untyped-def]
        now = time.monotonic()
        if not idle and now - self.last < EXPERT_LOAD_INTERVAL_S:
            return None
        self.last = now
        return core.read_expert_load() or None


def _busy_loop(core, pull: zmq.Socket, push: zmq.Socket, parent: int) -> None:  # type: ignore[no-untyped-def]
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    expert_load = _ExpertLoadReport()
    phases = _PHASES
    clock = time.perf_counter
    idle_work = not os.environ.get("SCALELLM_NO_KV_PREFAULT")
    trim_when_idle, trimmed = not os.environ.get("SCALELLM_NO_IDLE_TRIM"), False
    last_step = clock()
    while True:
        busy = core.has_unfinished_requests()
        if not busy:
            t = clock()
            if idle_work:  # a slice, then look for requests (at once if more work is ready)
                more = core.idle_work()
                idle_work = more is not False
                if more:  # (the warm-up step or a prefault slice ran: the idle spell starts after it)
                    last_step = clock()
                got = poller.poll(0 if more else IDLE_POLL_MS)
            else:
                if trim_when_idle and not trimmed and t - last_step >= IDLE_TRIM_S:
                    trimmed = True
                    try:
                        core.release_idle_kv()
                        trim_heap()
                    except Exception:  # memory hand-back is best effort: never the loop's end
                        logger.warning("idle memory release failed", exc_info=True)
                got = poller.poll(IDLE_POLL_MS)
            phases.idle += clock() - t
            if not got:
                if os.getppid() != parent:
                    logger.error("frontend process is gone; exiting")
                    return
                core.check_health()  # raises if a tensor-parallel rank died
                continue
        t = clock()
        changed = False
        while True:
            try:
                data = pull.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = ipc.decode_to_core(data)
            if isinstance(msg, ipc.AddRequests):
                for req in msg.requests:
                    core.add_core_request(req)
            elif isinstance(msg, ipc.AbortRequests):
                core.abort_requests(msg.request_ids)
                changed = True
            elif isinstance(msg, ipc.Shutdown):
                return
        phases.ipc += clock() - t
        if core.has_unfinished_requests():
            outputs = core.step()
            t = clock()
            last_step, trimmed = t, False
            load = expert_load.take(core, idle=not core.has_unfinished_requests())
            push.send(ipc.encode(ipc.CoreOutputs(outputs, _load(core), load)))
            phases.ipc += clock() - t
        elif changed:
            core.step()  # lets the worker drop aborted requests' state
            push.send(ipc.encode(ipc.CoreOutputs([], _load(core))))
