"""The GPU path at real shapes (run on a lent H100/H200 through the device tool).

Random weights at Llama-3-8B's shapes (bf16; then the same weights in fp8), no tokenizer:

1. the machine's ceilings: bf16 and fp8 matmul (8192^3) and a device-to-device copy;
2. decode step time at batch 1..256 over a fixed context, three ways: CUDA graph,
   eager with the Triton paged kernel, eager with the SDPA-over-gathered-K/V fallback;
   against the HBM floor (every weight byte + the batch's K/V read once per step);
3. prefill: 4 fresh prompts of 2,048 tokens in one step, FLOP/s against the matmul peak
   (attention by the paged Triton kernel, and by one SDPA call per chunk);
4. the engine end to end (scheduler + runner, greedy, 128 in / 128 out) at c = 1, 64, 256.

    python benchmarks/gpu_engine.py --out benchmarks/results/gpu_engine.json

Every phase is written to the output as soon as it ends (a cut-off run keeps what it has).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch

from scalellm.engine.config import SchedulerConfig
from scalellm.engine.core import EngineCore
from scalellm.engine.kv_cache_manager import KVCacheManager
from scalellm.engine.request import Request
from scalellm.engine.scheduler import Scheduler
from scalellm.layers.attention import AttentionMetadata, ForwardBatch, PrefillChunk
from scalellm.models.args import ModelArgs
from scalellm.models.llama import LlamaForCausalLM
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.worker.model_runner import ModelRunner

SHAPES = {
    "llama-3-8b": ModelArgs("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0, None, 8192,
                            False, False, False, False, None, None, ()),
    "llama-3.2-1b": ModelArgs("LlamaForCausalLM", 128256, 2048, 8192, 16, 32, 8, 64, 1e-5, 500000.0, None, 8192,
                              True, False, False, False, None, None, ()),
    "tiny": ModelArgs("LlamaForCausalLM", 1024, 128, 256, 2, 4, 2, 32, 1e-5, 10000.0, None, 4096,
                      True, False, False, False, None, None, ()),
}
BLOCK = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script (TRITON_INTERPRET=1)


def timed(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() on the GPU (CUDA events; wall clock on CPU, for dry runs)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[reps // 2]
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def ceilings() -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, reps=10)
    out = {"bf16_matmul_tflops": 2 * n**3 / ms / 1e9}
    from scalellm.quant.fp8 import FP8

    a8, b8 = a.to(FP8), b.to(FP8).t().contiguous().t()
    sa = torch.ones(n, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    ms = timed(lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16), reps=10)
    out["fp8_rowwise_matmul_tflops"] = 2 * n**3 / ms / 1e9
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), reps=10)
    out["copy_tb_s_read_plus_write"] = 2 * x.numel() / ms / 1e9
    del a, b, a8, b8, x, y
    torch.cuda.empty_cache()
    return out


def build_runner(args: ModelArgs, kv_gib: float, max_batch: int, model: LlamaForCausalLM | None = None) -> ModelRunner:
    dtype = torch.bfloat16
    device = torch.device(DEVICE)
    if model is None:
        with device:
            model = LlamaForCausalLM(args, dtype)
        torch.manual_seed(0)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        model.eval()
    bytes_per_block = 2 * args.num_layers * args.num_kv_heads * args.head_dim * BLOCK * 2
    num_blocks = int(kv_gib * (1 << 30)) // bytes_per_block
    return ModelRunner(model, args, block_size=BLOCK, num_blocks=num_blocks, dtype=dtype, device=device,
                       eos_token_ids=frozenset(), cuda_graph_max_batch=max_batch, max_model_len=args.max_position_embeddings)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of weights: every linear (bf16 or fp8) and the LM head."""
    total = 0
    for m in model.modules():
        fp8 = getattr(m, "fp8", None)
        if fp8 is not None:
            total += fp8.nbytes
        elif hasattr(m, "set_fp8"):
            total += m.weight.numel() * m.weight.element_size()
    head = model.lm_head.weight
    return total + head.numel() * head.element_size()


def decode_phase(runner: ModelRunner, args: ModelArgs, batches: list[int], ctx: int, copy_tbs: float,
                 graphs_only: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    per_seq = -(-ctx // BLOCK)
    wbytes = weight_bytes(runner.model)
    rows = []
    for b in batches:
        perm = torch.randperm(runner.num_blocks, generator=g)[: b * per_seq].view(b, per_seq).tolist()
        ids = torch.randint(0, args.vocab_size, (b,), generator=g).tolist()
        pos = [ctx - 1] * b
        slots = [t[(ctx - 1) // BLOCK] * BLOCK + (ctx - 1) % BLOCK for t in perm]
        lens = [ctx] * b
        row: dict = {"batch": b, "context": ctx}
        if runner.graphs is not None and b <= runner.graphs.max_batch:
            row["graph_ms"] = timed(lambda: runner.graphs.run(ids, pos, slots, lens, perm))
        dev = runner.device
        tables = torch.tensor(perm, dtype=torch.int32, device=dev)
        md = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), num_decode_tokens=b, decode_slots=None,
                               decode_mask=None, decode_lens=torch.tensor(lens, dtype=torch.long, device=dev),
                               block_tables=tables, block_size=BLOCK)
        batch = ForwardBatch(attn=md, kv_caches=runner.kv_caches)
        ids_t, pos_t = torch.tensor(ids, device=dev), torch.tensor(pos, device=dev)
        with torch.inference_mode():
            if graphs_only:
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            row["eager_triton_ms"] = timed(lambda: runner.model.compute_logits(runner.model(ids_t, pos_t, batch)))
            cs, mask = runner._context_slots(perm, lens)
            md2 = AttentionMetadata(slot_mapping=md.slot_mapping, num_decode_tokens=b, decode_slots=cs.to(dev),
                                    decode_mask=mask.view(b, 1, 1, -1).to(dev))
            batch2 = ForwardBatch(attn=md2, kv_caches=runner.kv_caches)
            row["eager_sdpa_gather_ms"] = timed(lambda: runner.model.compute_logits(runner.model(ids_t, pos_t, batch2)))
        kv_bytes = b * ctx * args.num_layers * args.num_kv_heads * args.head_dim * 2 * 2
        row["bytes_read"] = wbytes + kv_bytes
        row["floor_ms_at_copy_rate"] = (wbytes + kv_bytes) / (copy_tbs * 1e9)
        row["floor_ms_at_4.8TBs"] = (wbytes + kv_bytes) / 4.8e9
        best = row.get("graph_ms", row["eager_triton_ms"])
        row["achieved_tb_s"] = (wbytes + kv_bytes) / best / 1e9
        row["tokens_per_s"] = b / best * 1e3
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def unfused_decode(runner: ModelRunner, args: ModelArgs, batches: list[int], ctx: int, copy_tbs: float) -> list[dict]:
    """The same CUDA-graph decode steps with the fused Triton element-wise kernels off
    (torch ops for RMSNorm, rotary + KV write, SiLU), graphs re-captured."""
    from scalellm.layers import fused_gpu

    fused_gpu.ENABLED = False
    try:
        runner.graphs.capture()
        return decode_phase(runner, args, batches, ctx, copy_tbs, graphs_only=True)
    finally:
        fused_gpu.ENABLED = True
        runner.graphs.capture()


def linear_params(args: ModelArgs) -> int:
    e, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    per_layer = e * (args.num_heads + 2 * args.num_kv_heads) * d + args.num_heads * d * e + 3 * e * i
    return per_layer * args.num_layers


def prefill_phase(runner: ModelRunner, args: ModelArgs, prompts: int, length: int, peak_tflops: float) -> dict:
    dev = runner.device
    t = prompts * length
    chunks = [PrefillChunk(q_start=i * length, q_len=length, ctx_len=length, ctx_slots=None) for i in range(prompts)]
    per = -(-length // BLOCK)
    tables = torch.arange(prompts * per, dtype=torch.int32, device=dev).view(prompts, per)
    slots = (tables.long().unsqueeze(-1) * BLOCK + torch.arange(BLOCK, device=dev)).view(prompts, -1)[:, :length]
    meta = torch.tensor([[c.q_start for c in chunks], [length] * prompts, [length] * prompts], dtype=torch.int32,
                        device=dev)
    ids = torch.randint(0, args.vocab_size, (t,), device=dev)
    pos = torch.arange(length, device=dev).repeat(prompts)
    last = [(i + 1) * length - 1 for i in range(prompts)]
    out: dict = {"prompts": prompts, "length": length}
    flops = 2 * linear_params(args) * t + prompts * args.num_layers * 2 * length**2 * args.num_heads * args.head_dim
    for name, paged in (("triton_paged", True), ("sdpa_per_chunk", False)):
        md = AttentionMetadata(slot_mapping=slots.reshape(-1), num_decode_tokens=0, decode_slots=None,
                               decode_mask=None, prefills=chunks)
        if paged:  # what the runner builds on GPU: one kernel for every chunk
            md.prefill_tables, md.prefill_meta, md.prefill_max_q, md.block_size = tables, meta, length, BLOCK
        batch = ForwardBatch(attn=md, kv_caches=runner.kv_caches)
        with torch.inference_mode():
            ms = timed(lambda: runner.model.compute_logits(runner.model(ids, pos, batch)[last]), reps=5, warmup=2)
        tflops = flops / ms / 1e9
        out[name] = {"ms": ms, "tokens_per_s": t / ms * 1e3, "tflops": tflops, "fraction_of_matmul_peak": tflops / peak_tflops}
    print(json.dumps(out), flush=True)
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def engine_phase(runner: ModelRunner, args: ModelArgs, concurrency: list[int], in_len: int, out_len: int) -> list[dict]:
    sched = Scheduler(SchedulerConfig(8192, max(concurrency), args.max_position_embeddings),
                      KVCacheManager(runner.num_blocks, BLOCK))
    core = EngineCore(sched, runner)
    rows = []
    for k, c in enumerate([2] + concurrency):  # the first, tiny load is a warm-up
        g = torch.Generator().manual_seed(c)
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        for i in range(c):
            ids = torch.randint(100, args.vocab_size, (in_len,), generator=g).tolist()
            core.add_request(Request(f"c{c}-{i}-{time.monotonic_ns()}", ids, params, frozenset(), out_len))
        sync()
        tm = runner.timings
        before = (tm.prepare, tm.forward, tm.sample)
        t0 = time.perf_counter()
        first = None
        n_out = 0
        steps = 0
        slowest = 0.0
        while core.has_unfinished_requests():
            ts = time.perf_counter()
            outs = core.step()
            slowest = max(slowest, time.perf_counter() - ts)
            steps += 1
            n_out += sum(len(o.new_token_ids) for o in outs)
            if first is None and outs:
                first = time.perf_counter() - t0
        sync()
        dt = time.perf_counter() - t0
        if k:
            # per step: runner prepare (lists, tensors), forward (launch; the GPU wait shows up in
            # sample, whose token ids sync), and the rest (scheduler, outputs)
            prep, fwd, smp = ((now - was) / steps * 1e3 for now, was in zip((tm.prepare, tm.forward, tm.sample), before))
            row = {"concurrency": c, "seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt, "steps": steps,
                   "first_step_s": first, "tpot_ms": (dt - first) / (out_len - 1) * 1e3,
                   "step_ms": dt / steps * 1e3, "prepare_ms": prep, "forward_launch_ms": fwd,
                   "sample_and_gpu_wait_ms": smp, "scheduler_and_outputs_ms": dt / steps * 1e3 - prep - fwd - smp,
                   "slowest_step_ms": slowest * 1e3}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/gpu_engine.json")
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--batches", default="1,16,64,128,256")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--concurrency", default="1,64,256")
    p.add_argument("--kv-gib", type=float, default=40.0)
    p.add_argument("--phases", default="all", help="comma-separated phase names (default: all)")
    p.add_argument("--prefill-len", type=int, default=2048, help="tokens of each of the 4 prefill prompts")
    a = p.parse_args()
    args = SHAPES[a.shape]
    import triton

    result: dict = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
                    "shape": a.shape, "errors": {}}

    def save() -> None:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)

    def phase(name: str, fn: Callable[[], object]) -> object:
        if a.phases != "all" and name not in a.phases.split(","):
            return None
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:  # one broken phase must not lose the others' numbers
            result["errors"][name] = traceback.format_exc()
            print(result["errors"][name], flush=True)
        result.setdefault("phase_seconds", {})[name] = time.perf_counter() - t0
        save()
        return result.get(name)

    peaks = (phase("ceilings", ceilings) if DEVICE == "cuda" else None) or {}
    copy_tbs = peaks.get("copy_tb_s_read_plus_write", 4.0)
    batches = [int(x) for x in a.batches.split(",")]
    conc = [int(x) for x in a.concurrency.split(",")]
    t0 = time.perf_counter()
    runner = build_runner(args, a.kv_gib, max(batches))
    result["bf16_build_and_capture_s"] = time.perf_counter() - t0
    result["bf16_capture_s"] = runner.graphs.capture_seconds if runner.graphs else None
    phase("bf16_decode", lambda: decode_phase(runner, args, batches, a.context, copy_tbs))
    phase("bf16_prefill", lambda: prefill_phase(runner, args, 4, a.prefill_len, peaks.get("bf16_matmul_tflops", 790)))
    phase("bf16_engine", lambda: engine_phase(runner, args, conc, 128, 128))
    phase("bf16_decode_unfused", lambda: unfused_decode(runner, args, [1, 64], a.context, copy_tbs))
    model = runner.model
    del runner
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    for m in model.modules():
        if hasattr(m, "set_fp8"):
            m.set_fp8()
    t0 = time.perf_counter()
    runner = build_runner(args, a.kv_gib, max(batches), model)
    result["fp8_build_and_capture_s"] = time.perf_counter() - t0
    phase("fp8_decode", lambda: decode_phase(runner, args, batches, a.context, copy_tbs))
    phase("fp8_prefill", lambda: prefill_phase(runner, args, 4, a.prefill_len, peaks.get("fp8_rowwise_matmul_tflops", 1500)))
    phase("fp8_engine", lambda: engine_phase(runner, args, conc, 128, 128))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
