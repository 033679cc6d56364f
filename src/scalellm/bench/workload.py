"""Workloads: the list of BenchRequests a run sends, deterministic from a seed.

- synthetic: random English words fitted to an exact prompt length in tokens, counted
  by a TokenCounter (the server's /tokenize, or a local tokenizer). For chat the
  count is of the templated prompt, so `input_len` is what the model actually reads.
- shared prefix: G groups; each group's requests share a system prompt of exactly
  L tokens, followed by a unique question; total prompt = L + input_len tokens.
- prompt file: JSONL lines with "prompt" or "messages", optional "output_len"
  (or "max_tokens").

Output lengths are fixed ("128"), uniform ("64:256") or exponential ("exp:128").

What this module does NOT know: HTTP, endpoints' wire formats, the load model.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from scalellm.bench.records import BenchRequest

# NOTE: short, frequent words: nearly every byte-level BPE vocabulary has each of them
# (with its leading space) as one token, so a prompt of k words is ~k tokens and the
# fitting loop below converges in one or two counts.
WORDS = tuple(dict.fromkeys((
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "or had not but have one they you all their has been she new when who more will after first "
    "two would we there other time can into only its out up about so some than then most also over "
    "no what may years these many made any such could people city him part where world year well "
    "state back work under each while between did three just used both through war during life "
    "way being four end old during film long game day high same set own those early large good "
    "water small few group school name area best before right house line left found man great "
    "number public music later home second book play team power side north south west east red "
    "light road open show land family king might away place local river field party life real "
    "word test model data code page free note art sea air blue green black white car army love"
).split()))


class TokenCounter(Protocol):
    """Counts prompt tokens the way the served model reads them."""

    source: str  # "server" | a local tokenizer path

    async def count(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> int: ...


@dataclass(frozen=True)
class LengthSpec:
    kind: Literal["fixed", "uniform", "exp"]
    a: int
    b: int = 0

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        """"128" | "64:256" (uniform, inclusive) | "exp:128" (exponential, mean 128)."""
        t = text.strip()
        try:
            if t.startswith("exp:"):
                spec = cls("exp", int(t[4:]))
            elif ":" in t:
                lo, hi = t.split(":", 1)
                spec = cls("uniform", int(lo), int(hi))
            else:
                spec = cls("fixed", int(t))
        except ValueError:
            raise ValueError(f"bad length {text!r}: use N, LO:HI or exp:MEAN") from None
        if spec.a < 1 or (spec.kind == "uniform" and spec.b < spec.a):
            raise ValueError(f"bad length {text!r}: lengths are >= 1 and LO <= HI")
        return spec

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.randint(self.a, self.b)
        return max(1, round(rng.expovariate(1.0 / self.a)))

    def __str__(self) -> str:
        return {"fixed": f"{self.a}", "uniform": f"{self.a}:{self.b}", "exp": f"exp:{self.a}"}[self.kind]


@dataclass(frozen=True)
class WorkloadConfig:
    num_requests: int
    input_len: LengthSpec = LengthSpec("fixed", 128)
    output_len: LengthSpec = LengthSpec("fixed", 128)
    is_chat: bool = False
    prompt_file: str | None = None
    shared_prefix_groups: int = 0  # 0: no shared prefix
    shared_prefix_len: int = 0
    seed: int = 0
    max_fit_tries: int = 12


async def build(cfg: WorkloadConfig, counter: TokenCounter | None) -> list[BenchRequest]:
    """All requests of a workload. Synthetic workloads need a counter."""
    rng = random.Random(cfg.seed)
    if cfg.prompt_file:
        return await _from_file(cfg, counter, rng)
    if counter is None:
        raise ValueError("synthetic prompts of exact token lengths need a tokenizer: the server has no /tokenize; "
                         "give --tokenizer (a .gguf file or a Hugging Face model directory)")
    fitter = _Fitter(counter, cfg.is_chat, cfg.max_fit_tries)
    prefixes: list[str] = []
    if cfg.shared_prefix_groups > 0:
        prefixes = [await fitter.fit_prefix(random.Random(f"{cfg.seed}/prefix/{g}"), cfg.shared_prefix_len)
                    for g in range(cfg.shared_prefix_groups)]
    plans = []
    for i in range(cfg.num_requests):
        group = rng.randrange(len(prefixes)) if prefixes else -1
        plans.append((i, group, cfg.input_len.sample(rng), cfg.output_len.sample(rng)))
    sem = asyncio.Semaphore(16)

    async def one(i: int, group: int, n_in: int, n_out: int) -> BenchRequest:
        async with sem:
            word_rng = random.Random(f"{cfg.seed}/prompt/{i}")
            prefix = prefixes[group] if group >= 0 else None
            target = n_in + (cfg.shared_prefix_len if prefix is not None else 0)
            prompt, messages, n = await fitter.fit(word_rng, target, prefix)
            return BenchRequest(i, prompt, messages, n, n_out, group)

    return list(await asyncio.gather(*(one(*p) for p in plans)))


class _Fitter:
    """Finds k random words whose prompt (templated for chat) is exactly `target` tokens."""

    def __init__(self, counter: TokenCounter, is_chat: bool, max_tries: int) -> None:
        self.counter = counter
        self.is_chat = is_chat
        self.max_tries = max_tries
        self.num_misses = 0  # prompts that ended off their target (reported)

    async def fit_prefix(self, rng: random.Random, target: int) -> str:
        words = [rng.choice(WORDS) for _ in range(target + 8)]
        text, _ = await self._search(lambda k: self.counter.count(prompt=" ".join(words[:k])),
                                     lambda k: " ".join(words[:k]), target, target + 8)
        return text

    async def fit(self, rng: random.Random, target: int, prefix: str | None
                  ) -> tuple[str | None, list[dict[str, str]] | None, int]:
        cap = target + 16
        words = [rng.choice(WORDS) for _ in range(cap)]

        def make(k: int) -> tuple[str | None, list[dict[str, str]] | None]:
            text = " ".join(words[:k])
            if self.is_chat:
                msgs = [{"role": "system", "content": prefix}] if prefix is not None else []
                return None, msgs + [{"role": "user", "content": text}]
            return (f"{prefix}\n{text}" if prefix is not None else text), None

        async def count(k: int) -> int:
            prompt, messages = make(k)
            return await self.counter.count(prompt=prompt, messages=messages)

        (prompt, messages), n = await self._search(count, make, target, cap)
        return prompt, messages, n

    async def _search(self, count: Callable[[int], Awaitable[int]], make: Callable, target: int, cap: int):  # type: ignore[no-untyped-def]
        """Secant steps on k (word count) toward `target` tokens, then bisection."""
        seen: dict[int, int] = {}
        k = max(1, min(cap, target - (await count(1) - 1)))
        lo, hi = 0, cap + 1  # count(lo) < target < count(hi) once known
        for _ in range(self.max_tries):
            if k not in seen:
                seen[k] = await count(k)
            c = seen[k]
            if c == target:
                return make(k), c
            if c < target:
                lo = max(lo, k)
            else:
                hi = min(hi, k)
            nxt = k + (target - c)
            if not lo < nxt < hi or nxt in seen:
                nxt = (lo + hi) // 2
            if nxt in seen or nxt < 1 or nxt > cap:
                break
            k = nxt
        self.num_misses += 1
        best = min(seen, key=lambda j: (abs(seen[j] - target), -j))
        return make(best), seen[best]


async def _from_file(cfg: WorkloadConfig, counter: TokenCounter | None, rng: random.Random) -> list[BenchRequest]:
    assert cfg.prompt_file is not None
    rows: list[tuple[str | None, list[dict[str, str]] | None, int | None]] = []
    with open(cfg.prompt_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg.prompt_file}:{lineno}: not JSON ({e})") from None
            if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
                raise ValueError(f"{cfg.prompt_file}:{lineno}: give exactly one of \"prompt\" or \"messages\"")
            out = obj.get("output_len", obj.get("max_tokens"))
            if out is not None and (not isinstance(out, int) or out < 1):
                raise ValueError(f"{cfg.prompt_file}:{lineno}: output_len must be a positive integer")
            if "messages" in obj and not cfg.is_chat:
                raise ValueError(f"{cfg.prompt_file}:{lineno}: chat messages need --api chat")
            rows.append((obj.get("prompt"), obj.get("messages"), out))
    if not rows:
        raise ValueError(f"{cfg.prompt_file} has no prompts")
    order = list(range(len(rows)))
    rng.shuffle(order)
    out_lens = [cfg.output_len.sample(rng) for _ in range(cfg.num_requests)]

    async def one(i: int) -> BenchRequest:
        prompt, messages, n_out = rows[order[i % len(rows)]]
        if cfg.is_chat and messages is None:
            messages, prompt = [{"role": "user", "content": prompt or ""}], None
        n_in = await counter.count(prompt=prompt, messages=messages) if counter is not None else -1
        return BenchRequest(i, prompt, messages, n_in, n_out if n_out is not None else out_lens[i])

    return list(await asyncio.gather(*(one(i) for i in range(cfg.num_requests))))


def num_fit_misses(requests: list[BenchRequest], target: LengthSpec, prefix_len: int) -> int:
    """Requests whose prompt is off a fixed target length (0 for other length kinds)."""
    if target.kind != "fixed":
        return 0
    return sum(1 for r in requests if r.input_len >= 0 and r.input_len != target.a + prefix_len)
