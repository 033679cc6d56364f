"""What tensor parallelism adds per step on this machine, measured in pieces:

1. All-reduce latency between two processes (1 torch thread each) for one decode step's
   activations ([B, hidden] float32), the collective a TP forward runs 2x per layer
   (+1 embedding), three ways: gloo's all_reduce, a gloo isend/irecv exchange + add
   (the non-x86 CPU path), and our shared-memory all-reduce (distributed/shm_comm.py,
   the x86 CPU path). Tight loops: inside a forward, wake-ups cost more.
2. The step input the driver sends each worker rank, both ways we could: the
   SchedulerOutput as msgpack (what the executor sends; each rank then rebuilds the
   tensors itself) vs the prepared tensors (input ids, positions, slots, decode context
   slots and mask). Size, and the time to encode + move over ZMQ ipc + decode (one-way,
   from a round trip to an echo process / 2), for decode steps of B requests at a context
   of L tokens; plus the time the tensors take to prepare (what a rank given the
   SchedulerOutput spends, in parallel with rank 0).

    python benchmarks/tp_overheads.py [--batch-sizes 1,16,64 --context 256]

Writes benchmarks/results/tp_overheads.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import msgspec
import numpy as np
import torch

HIDDEN = 512  # the moe_cpu.py model's width

def _collectives(rank: int, port: int, sizes: list[int], iters: int) -> dict[str, dict[int, float]]:
    """Run by both ranks in lockstep; rank 0's timings are the result."""
    import torch.distributed as dist

    from scalellm.distributed import parallel_state as ps

    torch.set_num_threads(1)
    state = ps.init_tensor_parallel(rank, 2, "127.0.0.1", port, torch.device("cpu"), 60.0, store=_STORE)
    gloo = dataclasses.replace(state, shm=None)
    ways = {"gloo_all_reduce": lambda x: dist.all_reduce(x),
            "gloo_exchange_add": lambda x: ps.tensor_parallel_all_reduce(x),
            "shm_all_reduce": lambda x: state.shm.all_reduce(x)}
    out: dict[str, dict[int, float]] = {}
    for name, fn in ways.items():
        ps.set_parallel_state(gloo if name == "gloo_exchange_add" else state)
        out[name] = {}
        for n in sizes:
            x = torch.ones(n)
            for _ in range(20):
                fn(x)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn(x)
            out[name][n] = (time.perf_counter() - t0) / iters
    ps.set_parallel_state(state)
    ps.destroy_tensor_parallel()
    return out


_STORE = None


def allreduce_latency(sizes: list[int], iters: int) -> dict[str, dict[int, float]]:
    import datetime

    import torch.distributed as dist

    global _STORE
    _STORE = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    child = subprocess.Popen([sys.executable, __file__, "--child", str(_STORE.port), ",".join(map(str, sizes)),
                              str(iters)])
    out = _collectives(0, _STORE.port, sizes, iters)
    child.wait()
    return out


_ECHO_CHILD = r"""
import sys, zmq
s = zmq.Context().socket(zmq.PAIR); s.connect(sys.argv[1])
while True:
    frames = s.recv_multipart(copy=False)
    if len(frames) == 1 and bytes(frames[0]) == b"q": break
    s.send_multipart(frames, copy=False)
"""


def capture_steps(batch: int, context: int) -> tuple[list, list]:
    """Decode steps of `batch` requests from a tiny random model, with what _prepare built."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import build_tiny_model

    from scalellm import LLM, SamplingParams

    tmp = tempfile.mkdtemp()
    path = build_tiny_model(os.path.join(tmp, "llama"), "llama", max_position_embeddings=context + 64)
    llm = LLM(path, dtype="float32", max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * context),
              kv_cache_memory=64 << 20, enable_prefix_caching=False)
    runner = llm.engine.core.executor
    captured: list = []
    orig = runner._prepare

    def prepare(sched, order):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        res = orig(sched, order)
        if sched.total_num_scheduled_tokens == batch and not sched.new_requests:
            captured.append((sched, res, time.perf_counter() - t0))
        return res

    runner._prepare = prepare
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 500, (batch, context - 8), generator=g).tolist()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    return captured[-3:], [c[2] for c in captured]


def pack_tensors(res) -> list:  # type: ignore[no-untyped-def]
    input_ids, positions, batch, sample_ids, sample_rows = res
    md = batch.attn
    tensors = [input_ids, positions, md.slot_mapping]
    if md.decode_slots is not None:
        tensors += [md.decode_slots, md.decode_mask]
    tensors += [c.ctx_slots for c in md.prefills if c.ctx_slots is not None]
    header = msgspec.msgpack.encode({"shapes": [list(t.shape) for t in tensors], "dtypes": [str(t.dtype) for t in tensors],
                                     "sample_ids": sample_ids, "sample_rows": sample_rows,
                                     "prefills": [(c.q_start, c.q_len, c.ctx_len) for c in md.prefills]})
    return [header] + [t.contiguous().numpy().data for t in tensors]


def unpack_tensors(frames) -> list:  # type: ignore[no-untyped-def]
    header = msgspec.msgpack.decode(frames[0])
    out = []
    for f, shape, dtype in zip(frames[1:], header["shapes"], header["dtypes"]):
        np_dtype = {"torch.int64": np.int64, "torch.bool": np.bool_}[dtype]
        out.append(torch.from_numpy(np.frombuffer(f, dtype=np_dtype).reshape(shape)))
    return out


def transfer(batch: int, context: int, iters: int) -> dict:
    import zmq

    from scalellm.protocol import rank_ipc
    from scalellm.protocol.step import SchedulerOutput

    steps, prepare_s = capture_steps(batch, context)
    sched, res, _ = steps[-1]
    sampled = {r: 1 for r in sched.num_scheduled_tokens}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    addr = f"ipc://{tempfile.mkdtemp()}/echo"
    sock.bind(addr)
    child = subprocess.Popen([sys.executable, "-c", _ECHO_CHILD, addr])
    dec = msgspec.msgpack.Decoder(rank_ipc.StepInput)

    def via_sched() -> int:
        msg = rank_ipc.encode(rank_ipc.StepInput(sched, sampled))
        sock.send(msg)
        dec.decode(sock.recv())
        return len(msg)

    def via_tensors() -> int:
        frames = pack_tensors(res)
        sock.send_multipart(frames, copy=False)
        unpack_tensors([f.buffer for f in sock.recv_multipart(copy=False)])
        return sum(len(bytes(f)) if isinstance(f, bytes) else f.nbytes for f in frames)

    out = {}
    for name, fn in (("scheduler_output_msgpack", via_sched), ("prepared_tensors", via_tensors)):
        for _ in range(20):
            size = fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out[name] = {"bytes": size, "one_way_us": (time.perf_counter() - t0) / iters / 2 * 1e6}
    sock.send(b"q")
    child.wait()
    sock.close(linger=0)
    ctx.term()
    assert isinstance(sched, SchedulerOutput)
    out["prepare_us"] = min(prepare_s) * 1e6
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _collectives(1, int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tp_overheads.json"))
    a = ap.parse_args()
    batches = [int(b) for b in a.batch_sizes.split(",")]
    load_before = os.getloadavg()
    lat = allreduce_latency([b * HIDDEN for b in batches], a.iters)
    rows = []
    for b in batches:
        t = transfer(b, a.context, a.iters)
        ar = {name: v[b * HIDDEN] * 1e6 for name, v in lat.items()}
        rows.append({"batch": b, "context": a.context, "allreduce_us": ar, **t})
        print(f"B={b:3d}  all-reduce [{b}x{HIDDEN}] f32 us: " + ", ".join(f"{k} {v:.0f}" for k, v in ar.items())
              + " | step input: "
              f"SchedulerOutput {t['scheduler_output_msgpack']['bytes']:7d} B {t['scheduler_output_msgpack']['one_way_us']:6.0f} us, "
              f"tensors {t['prepared_tensors']['bytes']:7d} B {t['prepared_tensors']['one_way_us']:6.0f} us | "
              f"prepare {t['prepare_us']:6.0f} us", flush=True)
    result = {"machine": {"cores": os.cpu_count(), "torch": torch.__version__, "loadavg_before": load_before,
                          "loadavg_after": os.getloadavg()}, "hidden": HIDDEN, "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
