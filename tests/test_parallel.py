"""Tensor and expert parallelism for real: two gloo ranks (this process as rank 0, one
spawned worker) against the single-process engine on the same tiny models, the replica
serving with --tensor-parallel-size 2, and what happens when a rank dies."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
import torch

from scalellm import LLM, SamplingParams
from scalellm.distributed.parallel_state import get_parallel_state
from scalellm.engine.builder import check_parallel_fits
from scalellm.engine.config import EngineConfig
from scalellm.loader.model_source import resolve_model
from scalellm.models.args import parse_model_args
from scalellm.protocol.errors import InvalidParameterError
from scalellm.worker.executor import RankFailedError

PROMPT_LENS = [3, 9, 17, 26, 41, 55]
NEW_TOKENS = 8
# max_num_batched_tokens=16 < the longer prompts: chunked prefill mixed with decodes.
ENGINE = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=6, max_model_len=80,
              kv_cache_memory=1 << 20)


@pytest.fixture(scope="module")
def odd_vocab_llama(tmp_path_factory) -> str:
    """Tied embeddings and a vocabulary (509) that does not split in two: the last rank's
    slice of the embedding and LM head is padded."""
    from conftest import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("odd") / "llama"), "llama", vocab_size=509,
                            tie_word_embeddings=True)


def _prompts(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _run(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], dict[int, list[int]]]:
    llm.engine.core.read_expert_load()  # count from zero
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert llm.engine.stats().num_preemptions == 0
    return [o.outputs[0].token_ids for o in outs], llm.engine.core.read_expert_load()


def _worker_pids(llm: LLM) -> list[int]:
    return [p.pid for p in llm.engine.core.executor._procs]


@pytest.mark.parametrize("name,expert_parallel", [
    ("llama", False), ("mixtral", False), ("mixtral", True), ("qwen3_moe", True),
])
def test_two_ranks_match_one_process(tiny_moe_models, odd_vocab_llama, name, expert_parallel):
    path = odd_vocab_llama if name == "llama" else tiny_moe_models[name]
    single = LLM(path, **ENGINE)
    prompts = _prompts(single.engine.vocab_size)
    want_tokens, want_load = _run(single, prompts)
    threads = torch.get_num_threads()
    llm = LLM(path, tensor_parallel_size=2, enable_expert_parallel=expert_parallel, **ENGINE)
    try:
        executor = llm.engine.core.executor
        assert get_parallel_state().tp_size == 2 and get_parallel_state().expert_parallel == expert_parallel
        # each rank holds 1 of the 2 KV heads, so the same per-rank memory holds twice the blocks
        assert executor.runner.kv_caches[0].shape[3] == 1
        assert executor.runner.num_blocks // 2 == single.engine.core.executor.num_blocks
        got_tokens, got_load = _run(llm, prompts)
        assert got_tokens == want_tokens
        assert got_load == want_load  # routing is replicated; rank 0 counts every expert
        if want_load:
            top_k = executor.model.args.moe.top_k
            num_tokens = sum(PROMPT_LENS) + len(prompts) * (NEW_TOKENS - 1)
            assert all(sum(c) == num_tokens * top_k for c in got_load.values())
        if expert_parallel:  # rank 0 holds half of the experts, whole
            moe = next(m for m in executor.model.modules() if type(m).__name__ == "FusedMoE")
            assert moe.num_local_experts == moe.num_experts // 2 and moe.intermediate_size == moe.w2_weight.shape[2]
        pids = _worker_pids(llm)
    finally:
        llm.shutdown()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert get_parallel_state().tp_size == 1 and torch.get_num_threads() == threads


def test_dead_rank_fails_the_engine_at_once(tiny_models):
    """Killed between steps (caught before the next one) or in the middle of generating
    (caught inside a collective): either way the step raises within about a second."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for mid_step in (False, True):
        llm = LLM(tiny_models["llama"], tensor_parallel_size=2, **{**ENGINE, "max_model_len": 512})
        try:
            assert len(llm.generate([5, 6, 7], params)[0].outputs[0].token_ids) == 4
            pid = _worker_pids(llm)[0]
            if mid_step:
                killed_at = time.monotonic() + 0.3
                threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
                long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)  # seconds of steps
                with pytest.raises(RankFailedError, match="rank 1 exited with code -9"):
                    llm.generate([[5, 6, 7]] * 6, long)
            else:
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
                killed_at = time.monotonic()
                with pytest.raises(RankFailedError, match="rank 1 exited with code -9"):
                    llm.generate([5, 6, 7], params)
            assert time.monotonic() - killed_at < 2
        finally:
            llm.shutdown()


def test_parallel_config_errors_are_clear(tiny_models, tiny_moe_models):
    with pytest.raises(InvalidParameterError, match="needs tensor_parallel_size > 1"):
        EngineConfig(enable_expert_parallel=True)
    with pytest.raises(InvalidParameterError, match="tensor_parallel_size: must be >= 1"):
        EngineConfig(tensor_parallel_size=0)
    # model checks run before any rank starts
    with pytest.raises(InvalidParameterError, match="4 attention heads do not split across 3 ranks"):
        LLM(tiny_models["llama"], tensor_parallel_size=3, **ENGINE)
    with pytest.raises(InvalidParameterError, match="LlamaForCausalLM is a dense model"):
        LLM(tiny_models["llama"], tensor_parallel_size=2, enable_expert_parallel=True, **ENGINE)
    mixtral = parse_model_args(resolve_model(tiny_moe_models["mixtral"]).read_config())  # 4 experts, 4 heads
    six = dataclasses.replace(mixtral, moe=dataclasses.replace(mixtral.moe, num_experts=6))
    with pytest.raises(InvalidParameterError, match="6 experts do not split across 4 expert-parallel ranks"):
        check_parallel_fits(six, EngineConfig(tensor_parallel_size=4, enable_expert_parallel=True))
    narrow = dataclasses.replace(mixtral, moe=dataclasses.replace(mixtral.moe, intermediate_size=126))
    with pytest.raises(InvalidParameterError, match=r"expert width 126 .*\(try enable_expert_parallel\)"):
        check_parallel_fits(narrow, EngineConfig(tensor_parallel_size=4))
    one_kv = dataclasses.replace(mixtral, num_kv_heads=1)
    check_parallel_fits(one_kv, EngineConfig(tensor_parallel_size=4))  # a KV head replicated on every rank
    assert get_parallel_state().tp_size == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_memory_collectives_in_pieces(monkeypatch, dtype):
    """Two ranks (threads here) through one mapping with tiny slots: tensors far larger
    than a slot go through in many double-buffered rounds; sums and gathers in rank order."""
    from scalellm.distributed import shm_comm

    monkeypatch.setattr(shm_comm, "SLOT_BYTES", 256)
    path = shm_comm.ShmCommunicator.new_path()
    comms = [shm_comm.ShmCommunicator(0, 2, path, True, 10.0)]
    comms.append(shm_comm.ShmCommunicator(1, 2, path, False, 10.0))
    os.unlink(path)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(37, 29, generator=g).to(dtype) for _ in range(2)]  # 1073 elements: many 256-byte pieces
    results: dict[int, list[torch.Tensor]] = {}

    def rank(r: int) -> None:
        results[r] = [comms[r].all_reduce(xs[r]), comms[r].all_gather(xs[r], dim=-1), comms[r].all_reduce(xs[r] * 2)]

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r in range(2):
        reduced, gathered, doubled = results[r]
        assert torch.equal(reduced, xs[0] + xs[1]) and reduced.dtype == dtype
        assert torch.equal(gathered, torch.cat(xs, dim=-1))
        assert torch.equal(doubled, xs[0] * 2 + xs[1] * 2)
    for c in comms:
        c.close()


# ---------------------------------------------------------------------------- the replica


@pytest.fixture(scope="module")
def tp_server(tiny_moe_models):
    from test_server import Server

    s = Server(tiny_moe_models["mixtral"], "--served-model-name", "tiny", "--tensor-parallel-size", "2",
               "--enable-expert-parallel", "--kv-cache-memory", "0.01")
    yield s
    s.stop()


def test_replica_serves_with_two_ranks(tp_server, tiny_moe_models):
    prompt = [11, 22, 33, 44, 55]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{tp_server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    single = LLM(tiny_moe_models["mixtral"], **ENGINE)
    want = single.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert r.json()["choices"][0]["text"] == want.outputs[0].text
    assert r.json()["usage"]["completion_tokens"] == 6
    # expert load: every MoE layer saw (prompt + fed-back output) tokens x top-k
    text = httpx.get(f"{tp_server.url}/metrics").text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("scalellm_moe_expert_tokens_total{"):
            labels, value = line.rsplit(" ", 1)
            layer = labels.split('layer="')[1].split('"')[0]
            counts[layer] = counts.get(layer, 0) + float(value)
    assert counts == {"0": (5 + 6 - 1) * 2, "1": (5 + 6 - 1) * 2}


def test_replica_exits_when_a_rank_dies(tp_server):
    ranks = [p for p in psutil.Process(tp_server.proc.pid).children(recursive=True)
             if "rank_process" in " ".join(p.cmdline())]
    assert len(ranks) == 1
    t0 = time.monotonic()
    ranks[0].kill()
    code = tp_server.proc.wait(15)
    assert code != 0
    assert time.monotonic() - t0 < 5
    assert "tensor-parallel rank 1 exited with code -9" in tp_server.proc.stdout.read()
