"""Offline throughput: ScaleLLM's LLM.generate vs transformers' batched generate,
same model (default: the embedded SmolLM2-135M-Instruct GGUF), same dtype, same run.

Workload: N prompts of exactly IN tokens, OUT new tokens each (EOS ignored), all
submitted at once; plus single-request decode speed (TPOT) for both.

    python benchmarks/offline_throughput.py --num-prompts 64 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def make_prompts(vocab_size: int, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # avoid the first ids (often special tokens)
    return [torch.randint(100, vocab_size, (length,), generator=g).tolist() for _ in range(n)]


def bench_scalellm(args, prompts):
    from scalellm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=max(64, args.num_prompts))
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    runner = llm.engine.core.executor
    runner.timings.__init__()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    batch_s = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    tm = runner.timings
    breakdown = {"prepare_s": tm.prepare, "forward_s": tm.forward, "sample_s": tm.sample, "steps": tm.num_steps}
    t0 = time.perf_counter()
    single = llm.generate(prompts[0], params)[0]
    single_s = time.perf_counter() - t0
    ttft = single.metrics.first_token_time - single.metrics.arrival_time
    tpot = (single_s - ttft) / (len(single.outputs[0].token_ids) - 1)
    return {"load_s": load_s, "batch_s": batch_s, "output_tokens": n_out, "breakdown": breakdown,
            "single_s": single_s, "single_ttft_s": ttft, "single_tpot_s": tpot,
            "outputs": [o.outputs[0].token_ids for o in outs]}


def bench_transformers(args, prompts):
    import transformers

    from scalellm.loader.model_source import resolve_model

    src = resolve_model(args.model)
    from scalellm.worker.worker import resolve_dtype

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    path = src.path
    if src.is_gguf:
        # NOTE: transformers 5 keeps GGUF weights packed and dequantizes them on every forward;
        # give it the same weights as a plain HF directory so it is measured at its best.
        from scalellm.loader.convert import convert_gguf_to_hf

        path = os.path.join(os.path.dirname(__file__), ".cache", os.path.basename(src.path) + "-hf")
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            convert_gguf_to_hf(src.path, path, "bfloat16")
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    kw = dict(do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len)
    with torch.inference_mode():
        x = torch.tensor(prompts)
        model.generate(x[:2], attention_mask=torch.ones_like(x[:2]), do_sample=False, max_new_tokens=4)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
        batch_s = time.perf_counter() - t0
        x1 = x[:1]
        t0 = time.perf_counter()
        model.generate(x1, attention_mask=torch.ones_like(x1), do_sample=False, max_new_tokens=1, min_new_tokens=1)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(x1, attention_mask=torch.ones_like(x1), **kw)
        single_s = time.perf_counter() - t0
    n_out = out.shape[0] * (out.shape[1] - x.shape[1])
    return {"load_s": load_s, "batch_s": batch_s, "output_tokens": int(n_out), "single_s": single_s,
            "single_ttft_s": ttft, "single_tpot_s": (single_s - ttft) / (args.output_len - 1),
            "outputs": out[:, x.shape[1]:].tolist()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto", help="auto: what ScaleLLM picks for this machine")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "offline_throughput.json"))
    args = p.parse_args()

    from scalellm.loader.model_source import resolve_model
    from scalellm.models.args import parse_model_args

    vocab = parse_model_args(resolve_model(args.model).read_config()).vocab_size
    prompts = make_prompts(vocab, args.num_prompts, args.input_len, args.seed)
    ours = bench_scalellm(args, prompts)
    ref = None if args.skip_transformers else bench_transformers(args, prompts)

    def row(name, r):
        tput = r["output_tokens"] / r["batch_s"]
        total = (r["output_tokens"] + args.num_prompts * args.input_len) / r["batch_s"]
        return (f"{name:13s} batch {r['batch_s']:7.2f}s  out {tput:8.1f} tok/s  total {total:8.1f} tok/s  "
                f"single: TTFT {r['single_ttft_s'] * 1e3:7.1f} ms  TPOT {r['single_tpot_s'] * 1e3:6.2f} ms  load {r['load_s']:.1f}s")

    from scalellm.worker.worker import resolve_dtype

    print(f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, "
          f"dtype {args.dtype} -> {resolve_dtype(args.dtype, torch.device('cpu'))}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(row("scalellm", ours))
    summary = {"config": vars(args), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                                                  "python": sys.version.split()[0]},
               "scalellm": {k: v for k, v in ours.items() if k != "outputs"}}
    if ref is not None:
        print(row("transformers", ref))
        same = sum(a == b for a, b in zip(ours["outputs"], ref["outputs"]))
        ratio_tput = ref["batch_s"] / ours["batch_s"]
        ratio_tpot = ref["single_tpot_s"] / ours["single_tpot_s"]
        print(f"ratio (transformers time / scalellm time): batch throughput x{ratio_tput:.2f}, single TPOT x{ratio_tpot:.2f}; "
              f"greedy outputs identical for {same}/{len(prompts)} prompts")
        summary["transformers"] = {k: v for k, v in ref.items() if k != "outputs"}
        summary["ratios"] = {"batch_throughput": ratio_tput, "single_tpot": ratio_tpot, "identical_outputs": same}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
