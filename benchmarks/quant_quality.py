"""Quality of a quantized path against the unquantized model (same weights, same engine):
int8 (fbgemm W8A8) against float32, fp8 (e4m3 W8A8) against bfloat16, int4 (4-bit copies
for decode-sized calls) against bfloat16, or the 8-bit KV cache (`--kv-cache-dtype int8`)
against the model's dtype.

- greedy agreement: a fixed set of chat prompts, --max-tokens greedy tokens each;
  reports identical outputs and the mean length of the common token prefix.
- perplexity on a fixed public-domain text (the opening of A Tale of Two Cities),
  computed from the model's logits at every position, for both models.

    python benchmarks/quant_quality.py --out benchmarks/results/quant_quality.json
    python benchmarks/quant_quality.py --quantization fp8 --dtype bfloat16 --out benchmarks/results/quant_quality_fp8.json
    python benchmarks/quant_quality.py --kv-cache-dtype int8 --dtype bfloat16 --out benchmarks/results/quant_quality_kv_int8.json
    python benchmarks/quant_quality.py --quantization int4 --dtype bfloat16 --one-at-a-time --out benchmarks/results/quant_quality_int4.json

int4's perplexity runs every row of the text through the 4-bit weights (served, only calls
of up to 8 rows do); --one-at-a-time generates each prompt alone, so its decode steps (one
row) take the 4-bit path as a c=1 server's would.

With --kv-cache-dtype the perplexity pass runs the text in 32-token chunks, each attending
to the earlier ones through the KV cache (in the run's format), so the cache's codes count;
otherwise it is one fresh prefill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Iterator

import torch

from scalellm import LLM, SamplingParams
from scalellm.layers import linear
from scalellm.layers.attention import AttentionMetadata, ForwardBatch, PrefillChunk, fresh_prompt_batch

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one paragraph.",
    "List three uses of a paperclip.", "What is 17 times 23?", "Translate 'good morning' into Spanish.",
    "Who wrote Pride and Prejudice?", "Give me a tip for learning to cook.", "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.", "What are prime numbers?",
    "Summarise the plot of Romeo and Juliet.", "How do I boil an egg?", "Name the planets of the solar system.",
    "What is machine learning?", "Write a short poem about autumn.", "What does a CPU do?",
    "Suggest a name for a pet goldfish.", "How many days are there in a leap year?",
    "What is the boiling point of water?", "Tell me a fun fact about octopuses.", "What is gravity?",
    "How do vaccines work?", "Write one sentence about the moon.", "What is the largest ocean?",
    "Give an example of a renewable energy source.", "What is the Pythagorean theorem?",
    "Why do leaves change colour in autumn?", "What is a verb?", "How do airplanes fly?",
    "Recommend a book for a long train ride.", "What is the difference between weather and climate?",
]

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way--in short, the period was so far like the present period, that some of its noisiest "
    "authorities insisted on its being received, for good or for evil, in the superlative degree of "
    "comparison only. There were a king with a large jaw and a queen with a plain face, on the throne of "
    "England; there were a king with a large jaw and a queen with a fair face, on the throne of France. In "
    "both countries it was clearer than crystal to the lords of the State preserves of loaves and fishes, "
    "that things in general were settled for ever. It was the year of Our Lord one thousand seven hundred "
    "and seventy-five. Spiritual revelations were conceded to England at that favoured period, as at this. "
    "Mrs. Southcott had recently attained her five-and-twentieth blessed birthday, of whom a prophetic "
    "private in the Life Guards had heralded the sublime appearance by announcing that arrangements were "
    "made for the swallowing up of London and Westminster."
)


@torch.inference_mode()
def perplexity(llm: LLM, text: str) -> tuple[float, int]:
    model, args = llm.engine.core.executor.model, llm.engine.core.executor.args
    ids = llm.tokenizer.encode(text)
    t = len(ids)
    dtype = llm.engine.core.executor.dtype
    batch = fresh_prompt_batch(t, args.num_layers, args.num_kv_heads, args.head_dim, dtype)
    logits = model.compute_logits(model(torch.tensor(ids), torch.arange(t), batch)[:-1])  # [t-1, V]
    nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="mean")
    return math.exp(nll.item()), t


@torch.inference_mode()
def perplexity_through_cache(llm: LLM, text: str, chunk: int = 32) -> tuple[float, int]:
    """As `perplexity`, the text in `chunk`-token pieces: each attends to the ones before it
    through a KV cache in the format of the engine's (its dtype, or 8-bit codes + scales)."""
    runner = llm.engine.core.executor
    model, args = runner.model, runner.args
    ids = llm.tokenizer.encode(text)
    t = len(ids)
    shape = (2, t, 1, args.num_kv_heads, args.head_dim)  # blocks of one token: slot = position
    caches = [torch.zeros(shape, dtype=torch.int8 if runner.kv_codes else runner.dtype) for _ in range(args.num_layers)]
    scales = [torch.zeros(shape[:-1]) for _ in range(args.num_layers)] if runner.kv_codes else None
    logits = []
    for a in range(0, t, chunk):
        b = min(t, a + chunk)
        md = AttentionMetadata(slot_mapping=torch.arange(a, b), num_decode_tokens=0, decode_slots=None,
                               decode_mask=None, prefills=[PrefillChunk(q_start=0, q_len=b - a, ctx_len=b,
                                                                        ctx_slots=torch.arange(b) if a else None)])
        hidden = model(torch.tensor(ids[a:b]), torch.arange(a, b), ForwardBatch(md, caches, scales))
        logits.append(model.compute_logits(hidden))
    nll = torch.nn.functional.cross_entropy(torch.cat(logits)[:-1].float(), torch.tensor(ids[1:]), reduction="mean")
    return math.exp(nll.item()), t


@contextlib.contextmanager
def _int4_rows(rows: int) -> Iterator[None]:
    old, linear.INT4_MAX_ROWS = linear.INT4_MAX_ROWS, rows
    try:
        yield
    finally:
        linear.INT4_MAX_ROWS = old


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--quantization", default="int8", choices=["int8", "int4", "fp8"])
    p.add_argument("--one-at-a-time", action="store_true",
                   help="generate each prompt alone (decode steps of one row: int4's 4-bit path)")
    p.add_argument("--dtype", default="float32", help="of both runs (fp8: bfloat16)")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="int8: compare the 8-bit KV cache with the model's dtype (no weight quantization)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens)
    runs = {}
    base, quant = a.dtype, a.quantization
    variant = {"quantization": quant}
    if a.kv_cache_dtype == "int8":
        quant, variant = "kv-int8", {"kv_cache_dtype": "int8"}
    for name, kw in ((base, {}), (quant, variant)):
        llm = LLM(a.model, dtype=a.dtype, device=a.device, **kw)
        runner = llm.engine.core.executor
        while not runner.kernels_ready():  # the CPU kernels compile in the background
            time.sleep(0.1)
        t0 = time.perf_counter()
        chats = [[{"role": "user", "content": q}] for q in PROMPTS]
        outs = [llm.chat([c], params)[0] for c in chats] if a.one_at_a_time else llm.chat(chats, params)
        dt = time.perf_counter() - t0
        if name == "int4":  # every row of the text through the 4-bit weights, not only decode-sized calls
            with _int4_rows(10**9):
                ppl, ntok = perplexity(llm, TEXT)
        else:
            ppl, ntok = perplexity_through_cache(llm, TEXT) if a.kv_cache_dtype == "int8" else perplexity(llm, TEXT)
        runs[name] = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "texts": [o.outputs[0].text for o in outs],
                      "perplexity": ppl, "text_tokens": ntok, "generate_s": dt}
        print(f"{name}: perplexity {ppl:.4f} over {ntok} tokens; {len(PROMPTS)} prompts in {dt:.1f}s", flush=True)
        del llm
    ref, q = runs[base], runs[quant]
    same = sum(a_ == b_ for a_, b_ in zip(ref["tokens"], q["tokens"]))
    prefixes = []
    for a_, b_ in zip(ref["tokens"], q["tokens"]):
        n = 0
        while n < min(len(a_), len(b_)) and a_[n] == b_[n]:
            n += 1
        prefixes.append(n)
    summary = {
        "prompts": len(PROMPTS), "max_tokens": a.max_tokens, "identical_outputs": same,
        "mean_common_prefix_tokens": sum(prefixes) / len(prefixes),
        "reference": base, "quantization": quant,
        f"perplexity_{base}": ref["perplexity"], f"perplexity_{quant}": q["perplexity"],
        "perplexity_delta_pct": 100 * (q["perplexity"] / ref["perplexity"] - 1),
    }
    print(json.dumps(summary, indent=1))
    for i, (ta, tb) in enumerate(zip(ref["texts"], q["texts"])):
        if ta != tb:
            print(f"--- prompt {i}: {PROMPTS[i]!r}\n  {base}: {ta[:160]!r}\n  {quant}: {tb[:160]!r}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"summary": summary, "runs": runs, "prompts": PROMPTS}, f, indent=1)


if __name__ == "__main__":
    main()
