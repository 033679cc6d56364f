"""GPU check of the engine (run on a lent H100/H200 through the device tool).

1. Exactness on CUDA: a tiny random Llama built with transformers; our batched greedy
   generation (fp32, small blocks/budget so chunking and preemption happen) must equal
   transformers' generate on the same GPU.
2. Throughput at real shapes with random weights (no tokenizer, token ids only):
   Llama-3.2-1B-like and Llama-3-8B-like in bf16, decode tokens/s at concurrency 1/16/64
   with the torch reference attention backend.

    python benchmarks/gpu_engine.py --out benchmarks/results/gpu_engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from scalellm.engine.config import SchedulerConfig
from scalellm.engine.core import EngineCore
from scalellm.engine.kv_cache_manager import KVCacheManager
from scalellm.engine.request import Request
from scalellm.engine.scheduler import Scheduler
from scalellm.models.args import ModelArgs
from scalellm.models.llama import LlamaForCausalLM
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.worker.model_runner import ModelRunner


def exactness_check(device: str) -> dict:
    import transformers

    from scalellm import LLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.1, eos_token_id=0, bos_token_id=None, pad_token_id=0)
    with tempfile.TemporaryDirectory() as d:
        ref = transformers.LlamaForCausalLM(cfg)
        ref.save_pretrained(d)
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        tok.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": None}, f)
        g = torch.Generator().manual_seed(7)
        prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 9, 17, 30, 44, 61, 80, 99)]
        llm = LLM(d, dtype="float32", device=device, block_size=8, max_num_batched_tokens=48, max_num_seqs=6,
                  kv_cache_memory=20 * 8192, max_model_len=128)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        ref = ref.to(device).eval()
        ref.generation_config.eos_token_id = None
        same = 0
        with torch.inference_mode():
            for p, o in zip(prompts, outs):
                x = torch.tensor([p], device=device)
                seq = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16, do_sample=False)
                same += seq[0, len(p):].tolist() == o.outputs[0].token_ids
        return {"identical": same, "prompts": len(prompts), "preemptions": llm.engine.stats().num_preemptions}


def random_engine(args: ModelArgs, device: str, max_seqs: int, kv_gib: float) -> EngineCore:
    dtype = torch.bfloat16
    with torch.device(device):
        model = LlamaForCausalLM(args, dtype)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    block_size = 16
    bytes_per_block = 2 * args.num_layers * args.num_kv_heads * args.head_dim * block_size * 2
    num_blocks = int(kv_gib * (1 << 30)) // bytes_per_block
    runner = ModelRunner(model, args, block_size=block_size, num_blocks=num_blocks, dtype=dtype,
                         device=torch.device(device), eos_token_ids=frozenset())
    sched = Scheduler(SchedulerConfig(8192, max_seqs, 4096), KVCacheManager(num_blocks, block_size))
    return EngineCore(sched, runner)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_load(core: EngineCore, concurrency: int, in_len: int, out_len: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(concurrency)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    for i in range(concurrency):
        ids = torch.randint(100, vocab, (in_len,), generator=g).tolist()
        core.add_request(Request(f"c{concurrency}-{i}", ids, params, frozenset(), out_len))
    _sync()
    t0 = time.perf_counter()
    first = None
    n_out = 0
    while core.has_unfinished_requests():
        outs = core.step()
        n_out += sum(len(o.new_token_ids) for o in outs)
        if first is None and outs:
            first = time.perf_counter() - t0
    _sync()
    dt = time.perf_counter() - t0
    return {"concurrency": concurrency, "seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "first_step_s": first, "tpot_ms": (dt - first) / (out_len - 1) * 1e3}


SHAPES = {
    "llama-3.2-1b": ModelArgs("LlamaForCausalLM", 128256, 2048, 8192, 16, 32, 8, 64, 1e-5, 500000.0, None, 4096,
                              True, False, False, False, None, None, ()),
    "tiny": ModelArgs("LlamaForCausalLM", 1024, 128, 256, 2, 4, 2, 32, 1e-5, 10000.0, None, 4096,
                      True, False, False, False, None, None, ()),
    "llama-3-8b": ModelArgs("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0, None, 4096,
                            False, False, False, False, None, None, ()),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/gpu_engine.json")
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--device", default="cuda")
    p.add_argument("--kv-gib", type=float, default=16.0)
    a = p.parse_args()
    device = a.device
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    result = {"device": name, "torch": torch.__version__}
    result["exactness"] = exactness_check(device)
    print("exactness:", result["exactness"], flush=True)
    result["throughput"] = {}
    for name in a.shapes.split(","):
        core = random_engine(SHAPES[name], device, 256, a.kv_gib)
        run_load(core, 2, 32, 4, SHAPES[name].vocab_size)  # warm-up
        rows = []
        for c in map(int, a.concurrency.split(",")):
            r = run_load(core, c, 128, 128, SHAPES[name].vocab_size)
            rows.append(r)
            print(f"{name:14s} c={c:3d}: {r['output_tok_s']:9.1f} out tok/s, TPOT {r['tpot_ms']:6.2f} ms", flush=True)
        result["throughput"][name] = rows
        del core
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
