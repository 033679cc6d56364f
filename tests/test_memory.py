"""memory.drop_library_pages: resident pages of a library's read-only mappings go, and the
library still works (its pages come back from the page cache when touched)."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from conftest import wait_for_kernels

from scalellm.memory import drop_library_pages


def _resident_kib(fragment: str, perms: str | None = None) -> int:
    """Resident KiB of the mappings of files whose path contains `fragment`: the read-only
    ones, or those with exactly `perms` (e.g. "r-xp")."""
    total, counting = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                counting = len(head) == 6 and fragment in head[5] and (
                    "w" not in head[1] if perms is None else head[1] == perms)
            elif counting and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")
def test_drop_library_pages_frees_resident_code_and_the_library_still_runs():
    a = torch.randn(64, 64)
    expected = a @ a
    before = _resident_kib("libtorch_cpu")
    assert before > 1024
    assert drop_library_pages("libtorch_cpu") > 0
    after = _resident_kib("libtorch_cpu")
    assert after < before / 2
    assert torch.equal(a @ a, expected)  # code pages fault back in
    assert drop_library_pages("no-such-library-anywhere") == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")
def test_drop_library_pages_code_only_unmaps_code_and_leaves_data_pages():
    a = torch.randn(64, 64)
    expected = torch.softmax(a, -1) @ a
    code, data = _resident_kib("libtorch_cpu", "r-xp"), _resident_kib("libtorch_cpu", "r--p")
    assert code > 1024 and data > 0
    assert drop_library_pages("libtorch_cpu", code_only=True) > 0
    assert _resident_kib("libtorch_cpu", "r-xp") < code / 2
    assert _resident_kib("libtorch_cpu", "r--p") == data  # RELRO/rodata: never dropped this way
    assert torch.equal(torch.softmax(a, -1) @ a, expected)


@pytest.mark.parametrize("resident", [None, 96 << 20])
def test_prefault_kv_maps_the_cache_and_keeps_its_contents(tiny_models, resident):
    """Idle-time prefaulting: every page of the lazily mapped KV cache's resident budget (a
    quarter of it by default, or all of it) becomes resident, and what the cache holds (a
    prefix-cached block, say) is left as it was."""
    import torch

    from scalellm import LLM, SamplingParams

    # NOTE: whether the cache starts out lazily mapped depends on the process's allocation
    # history (calloc may hand out recycled, already-zeroed heap): only the end state is checked
    llm = LLM(tiny_models["llama"], dtype="float32", block_size=4, kv_cache_memory=96 << 20,
              kv_cache_resident=resident)
    runner = llm.engine.core.executor
    budget = llm.engine.core.scheduler.kv_cache.pool.resident_blocks
    assert budget == (runner.num_blocks // 4 if resident is None else runner.num_blocks)
    wait_for_kernels(runner)  # else the warm-up step empties the stand-ins' prefix cache
    out = llm.generate([5, 6, 7, 8, 9, 10, 11, 12, 13], SamplingParams(temperature=0.0, max_tokens=4))

    def resident_fraction(t: torch.Tensor) -> float:  # mincore(2) over the tensor's pages
        import ctypes
        import mmap

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        page = mmap.PAGESIZE
        start = t.data_ptr() // page * page
        length = t.data_ptr() + t.numel() * t.element_size() - start
        vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
        assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) == 0
        return sum(v & 1 for v in vec) / len(vec)

    # the request's full blocks (9 + 4 tokens in blocks of 4: ids 0-2) stay cached after it
    before = [c[:, :3].clone() for c in runner.kv_caches]
    assert all(bool(b.any()) for b in before)  # it left K/V behind (prefix cache)

    core = llm.engine.core
    stats = core.stats()
    slices = 0
    while (more := core.idle_work()) is not False:
        slices += bool(more)
    assert core.warmed_up  # the full-budget warm-up step ran, outside the prefix cache and counters
    assert core.stats() == stats
    assert slices >= budget // 8 - 1
    assert core.idle_work() is False  # done: nothing left
    for b, c in zip(before, runner.kv_caches):
        assert torch.equal(b, c[:, :3])
    assert all(resident_fraction(half[:budget]) == 1.0 for c in runner.kv_caches for half in c)
    again = llm.generate([5, 6, 7, 8, 9, 10, 11, 12, 13], SamplingParams(temperature=0.0, max_tokens=4))
    assert again[0].outputs[0].token_ids == out[0].outputs[0].token_ids
    assert core.stats().prefix_cache_hits == stats.prefix_cache_hits + 8  # the cached blocks served it


def test_idle_release_hands_back_the_kv_memory_past_the_budget(tiny_models):
    """A burst that needs more KV blocks than the resident budget touches fresh ones; once
    idle, release_idle_kv makes those past the budget fresh again and hands their pages back
    (mincore: not resident), and later requests that reuse them generate what they did."""
    import ctypes
    import mmap

    from scalellm import LLM, SamplingParams

    block_bytes = 2 * 2 * 2 * 16 * 4 * 4  # K+V, 2 layers, 2 KV heads x head dim 16, fp32, 4 tokens
    llm = LLM(tiny_models["llama"], dtype="float32", block_size=4, kv_cache_memory=1024 * block_bytes,
              kv_cache_resident=64 * block_bytes, enable_prefix_caching=False)
    core, runner = llm.engine.core, llm.engine.core.executor
    pool = core.scheduler.kv_cache.pool
    wait_for_kernels(runner)
    assert pool.resident_blocks == 64
    prompts = [[5 + (i * 7 + j) % 400 for j in range(40)] for i in range(12)]  # 12 x (40 + 24) tokens: 192 blocks
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    touched = pool.num_touched_blocks
    assert touched > 64 + 64

    def resident(lo: int, hi: int) -> float:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        page, total, hits = mmap.PAGESIZE, 0, 0
        for cache in runner.kv_caches:
            for half in cache[:, lo:hi]:
                start = -(-half.data_ptr() // page) * page
                end = (half.data_ptr() + half.numel() * half.element_size()) // page * page
                vec = (ctypes.c_ubyte * ((end - start) // page))()
                assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) == 0
                total, hits = total + len(vec), hits + sum(v & 1 for v in vec)
        return hits / total

    assert resident(64, touched) == 1.0
    below = [c[:, :64].clone() for c in runner.kv_caches]
    released = core.release_idle_kv()
    assert pool.num_touched_blocks == 64 and released >= 0.8 * (touched - 64) * block_bytes  # whole pages only
    assert resident(64, touched) == 0.0
    for b, c in zip(below, runner.kv_caches):
        assert torch.equal(b, c[:, :64])  # the budget's blocks keep their pages and contents
        assert not c[:, 64 + 8 : touched - 8].any()  # released pages read as zeros (8 blocks a page)
    assert core.release_idle_kv() == 0  # nothing more
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert again == first and pool.num_touched_blocks == touched


def test_warm_up_drops_the_prefix_cache_of_steps_run_on_the_stand_ins(tiny_models, monkeypatch):
    """Steps that ran before the CPU kernels were ready (the torch stand-ins) leave their K/V
    in the prefix cache; the warm-up step that follows the kernels empties it, so a repeated
    prompt is computed again by the kernels. Steps run with the kernels ready keep theirs."""
    from scalellm import LLM, SamplingParams

    llm = LLM(tiny_models["llama"], dtype="float32", block_size=4, kv_cache_memory=16 << 20)
    core, runner = llm.engine.core, llm.engine.core.executor
    wait_for_kernels(runner)
    greedy = SamplingParams(temperature=0.0, max_tokens=2)
    prompt = list(range(5, 18))  # 13 tokens: 3 full blocks of 4 get cached

    ready = [False]
    monkeypatch.setattr(runner, "kernels_ready", lambda: ready[0])
    llm.generate(prompt, greedy)
    assert core.stand_in_steps > 0 and core.idle_work() is not False  # no warm-up before the kernels
    assert core.scheduler.kv_cache.pool.num_cached_blocks == 3
    ready[0] = True
    while core.idle_work() is not False:
        pass
    assert core.warmed_up and core.scheduler.kv_cache.pool.num_cached_blocks == 0
    hits = core.stats().prefix_cache_hits
    llm.generate(prompt, greedy)
    assert core.stats().prefix_cache_hits == hits  # computed again
    llm.generate(prompt, greedy)
    assert core.stats().prefix_cache_hits == hits + 12  # and cached from then on


def test_warm_up_waits_for_an_idle_grace_period(tiny_models, monkeypatch):
    """The warm-up step (a full token budget, uninterruptible) runs only once the engine has
    been idle for WARM_UP_GRACE_S: a request sent right after /ready, or soon after another
    one, is not queued behind it."""
    from scalellm import LLM, SamplingParams
    from scalellm.engine import core as core_module

    monkeypatch.setattr(core_module, "WARM_UP_GRACE_S", 0.3)
    llm = LLM(tiny_models["llama"], dtype="float32", block_size=4, kv_cache_memory=16 << 20)
    core, runner = llm.engine.core, llm.engine.core.executor
    wait_for_kernels(runner)
    llm.generate([5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=2))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.15:  # within the grace period: KV prefault slices only
        assert core.idle_work() is not False
    assert not core.warmed_up
    time.sleep(0.2)
    while core.idle_work() is not False:
        pass
    assert core.warmed_up


def test_core_loop_trims_the_heap_once_per_idle_spell(tiny_models, monkeypatch):
    """The engine core process's loop hands its heap's free pages back once it has been idle
    for IDLE_TRIM_S, once per idle spell: again only after a step ran; never with
    SCALELLM_NO_IDLE_TRIM=1. (The loop runs on a thread here, over in-process sockets.)"""
    import os
    import threading

    import zmq

    from scalellm import LLM, SamplingParams
    from scalellm.protocol import ipc
    from scalellm.protocol.step import CoreRequest
    from scalellm.server import core_process

    llm = LLM(tiny_models["llama"], dtype="float32", block_size=4, kv_cache_memory=16 << 20)
    core = llm.engine.core
    wait_for_kernels(core.executor)
    trims: list[float] = []
    releases: list[int] = []
    monkeypatch.setattr(core_process, "trim_heap", lambda: trims.append(time.monotonic()))
    real_release = core.release_idle_kv
    monkeypatch.setattr(core, "release_idle_kv", lambda: releases.append(real_release()) or releases[-1])
    monkeypatch.setattr(core_process, "IDLE_TRIM_S", 0.4)
    monkeypatch.setenv("SCALELLM_NO_KV_PREFAULT", "1")  # no idle work before the trim

    def run_loop(name: str, requests: int) -> list[float]:
        trims.clear()
        ctx = zmq.Context()
        to_core, pull, push, from_core = (ctx.socket(k) for k in (zmq.PUSH, zmq.PULL, zmq.PUSH, zmq.PULL))
        to_core.bind(f"inproc://{name}-in")
        pull.connect(f"inproc://{name}-in")
        from_core.bind(f"inproc://{name}-out")
        push.connect(f"inproc://{name}-out")
        loop = threading.Thread(target=core_process._busy_loop, args=(core, pull, push, os.getppid()))
        loop.start()
        try:
            time.sleep(0.8)
            spells = [len(trims)]  # the first idle spell (since the loop started)
            for i in range(requests):
                req = CoreRequest(f"{name}{i}", [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=3), [], 3)
                to_core.send(ipc.encode(ipc.AddRequests([req])))
                while not any(o.finish_reason for o in ipc.decode_from_core(from_core.recv()).outputs):
                    pass
                spells.append(len(trims))  # right after the step: not yet
                time.sleep(0.8)
                spells.append(len(trims))
        finally:
            to_core.send(ipc.encode(ipc.Shutdown()))
            loop.join(timeout=10)
            for s in (to_core, pull, push, from_core):
                s.close(linger=0)
            ctx.term()
        return spells

    assert run_loop("on", 2) == [1, 1, 2, 2, 3]
    assert len(releases) == 3  # the KV past the resident budget went back with each trim
    monkeypatch.setenv("SCALELLM_NO_IDLE_TRIM", "1")
    assert run_loop("off", 1) == [0, 0, 0] and len(releases) == 3
