"""Decode throughput of a small random-weight Mixtral on CPU: our engine (`LLM.generate`)
vs transformers' forward with its KV cache, same weights, float32, same run.

Model: hidden 512, 8 experts of intermediate 1024, top-2, 4 layers, 8 heads / 2 KV heads,
vocab 4096 (~58M parameters, ~17M active per token). Workload per batch size B: B prompts
of PROMPT_LEN random tokens, then DECODE greedy tokens each (EOS ignored).

    ours: time(generate B prompts, 1 + DECODE tokens) - time(generate B other prompts, 1 token)
          = B * DECODE decode tokens (prefix caching off, so both runs prefill in full);
          the same difference of the model runner's forward time gives forward-only tok/s
    transformers: prefill once, then time DECODE single-token forwards with past_key_values
          (twice: its default experts implementation `grouped_mm`, and `eager`, a loop over
          the experts that were hit)

Best of --repeats for each. Results go to benchmarks/results/moe_cpu.json.

    python benchmarks/moe_cpu.py [--batch-sizes 1,16,64 --decode-tokens 32 --repeats 3]

--parallel instead compares our engine with itself: one process (torch's default
threads) vs tensor parallel over 2 ranks vs expert parallel over 2 ranks (1 thread
per rank on 2 cores), same measurement, same prompts; greedy tokens are checked equal.
Results go to benchmarks/results/moe_cpu_parallel.json.

    python benchmarks/moe_cpu.py --parallel [--batch-sizes 1,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

CONFIG = dict(
    vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
    sliding_window=None, eos_token_id=0, bos_token_id=None, pad_token_id=0,
)


def build_model(path: str) -> str:
    """A random-weight Mixtral saved with save_pretrained, plus a word-level tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**CONFIG))
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(CONFIG["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t0"}, f)
    return path


def make_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, CONFIG["vocab_size"], (n, length), generator=g).tolist()


def bench_ours(path: str, batch: int, prompt_len: int, decode: int, repeats: int, **parallel: object) -> dict:
    from scalellm import LLM, SamplingParams

    llm = LLM(path, dtype="float32", max_num_seqs=max(batch, 1), max_num_batched_tokens=max(2048, batch * prompt_len),
              kv_cache_memory=256 << 20, enable_prefix_caching=False, **parallel)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=1 + decode, ignore_eos=True)
    llm.generate(make_prompts(batch, prompt_len, 99), full)  # warm-up
    runner = llm.engine.core.executor
    runner.model.read_expert_load()
    best, best_forward, tokens = float("inf"), float("inf"), []
    for r in range(repeats):
        f0, t0 = runner.timings.forward, time.perf_counter()
        llm.generate(make_prompts(batch, prompt_len, 1000 + r), one)
        f1, t1 = runner.timings.forward, time.perf_counter()
        outs = llm.generate(make_prompts(batch, prompt_len, r), full)
        f2, t2 = runner.timings.forward, time.perf_counter()
        best = min(best, (t2 - t1) - (t1 - t0))
        best_forward = min(best_forward, (f2 - f1) - (f1 - f0))
        if r == 0:  # compared with transformers on the same prompts
            tokens = [o.outputs[0].token_ids for o in outs]
    load = runner.model.read_expert_load()
    llm.shutdown()
    return {"decode_s": best, "tok_per_s": batch * decode / best,
            "forward_only_tok_per_s": batch * decode / best_forward,  # model forward + logits, no engine
            "tokens": tokens, "expert_load_layer0": load.get(0, [])}


def bench_transformers(path: str, batch: int, prompt_len: int, decode: int, repeats: int, experts: str) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_experts_implementation(experts)
    best, tokens = float("inf"), []
    with torch.inference_mode():
        for r in range(-1, repeats):  # r = -1: warm-up
            x = torch.tensor(make_prompts(batch, prompt_len, max(r, 0)))
            out = model(x, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            seq = [nxt]
            t0 = time.perf_counter()
            for _ in range(decode):
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                seq.append(nxt)
            elapsed = time.perf_counter() - t0
            if r >= 0:
                best = min(best, elapsed)
            if r == 0:
                tokens = torch.cat(seq, dim=1).tolist()  # [B, 1 + DECODE]
    return {"decode_s": best, "tok_per_s": batch * decode / best, "tokens": tokens}


PARALLEL_MODES = {
    "single": {},
    "tp2": {"tensor_parallel_size": 2},
    "ep2": {"tensor_parallel_size": 2, "enable_expert_parallel": True},
}


def main_parallel(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(os.path.join(tmp, "mixtral"))
        for b in (int(s) for s in args.batch_sizes.split(",")):
            runs = {m: bench_ours(path, b, args.prompt_len, args.decode_tokens, args.repeats, **kw)
                    for m, kw in PARALLEL_MODES.items()}
            tokens = {m: r.pop("tokens") for m, r in runs.items()}
            same = {m: f"{sum(x == y for x, y in zip(tokens['single'], t))}/{b}" for m, t in tokens.items()}
            for r in runs.values():
                r.pop("expert_load_layer0")
            rows.append({"batch": b, **runs, "greedy_sequences_identical_to_single": same})
            print(f"B={b:3d}  " + "  ".join(f"{m} {r['tok_per_s']:7.1f} tok/s (forward {r['forward_only_tok_per_s']:7.1f})"
                                           for m, r in runs.items()) + f"  identical {same}", flush=True)
    result = {
        "model": {k: v for k, v in CONFIG.items() if not k.endswith("token_id")},
        "dtype": "float32", "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
        "repeats": args.repeats, "modes": PARALLEL_MODES,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads_single": torch.get_num_threads(), "torch": torch.__version__,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "wall_s": time.perf_counter() - t_start,
        "rows": rows,
    }
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "moe_cpu_parallel.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parallel", action="store_true", help="single process vs TP=2 vs EP=2 (ours only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.parallel:
        main_parallel(args)
        return
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", "moe_cpu.json")
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(os.path.join(tmp, "mixtral"))
        for b in (int(s) for s in args.batch_sizes.split(",")):
            ours = bench_ours(path, b, args.prompt_len, args.decode_tokens, args.repeats)
            refs = {impl: bench_transformers(path, b, args.prompt_len, args.decode_tokens, args.repeats, impl)
                    for impl in ("grouped_mm", "eager")}
            ours_tokens = ours.pop("tokens")
            same = {impl: sum(x == y for x, y in zip(ours_tokens, ref.pop("tokens"))) for impl, ref in refs.items()}
            rows.append({"batch": b, "ours": ours, "transformers": refs,
                         "speedup_vs": {impl: ref["decode_s"] / ours["decode_s"] for impl, ref in refs.items()},
                         "greedy_sequences_identical": {impl: f"{n}/{b}" for impl, n in same.items()}})
            print(f"B={b:3d}  ours {ours['tok_per_s']:7.1f} tok/s (forward only {ours['forward_only_tok_per_s']:7.1f})  "
                  + "  ".join(f"transformers[{i}] {r['tok_per_s']:7.1f} tok/s (x{rows[-1]['speedup_vs'][i]:.2f})"
                              for i, r in refs.items())
                  + f"  identical sequences {same}", flush=True)
    result = {
        "model": {k: v for k, v in CONFIG.items() if not k.endswith("token_id")},
        "dtype": "float32",
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "wall_s": time.perf_counter() - t_start,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
