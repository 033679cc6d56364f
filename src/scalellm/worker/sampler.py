"""Batched sampling with per-request parameters.

Order of operations on the float32 logits [B, V]:
  1. logprobs (if any request asks) from the raw model logits,
  2. min_tokens: EOS and stop tokens masked until enough tokens were produced,
  3. penalties: repetition (prompt + output), presence and frequency (output),
  4. greedy rows: argmax; other rows: temperature, top-k, top-p, min-p, then one
     draw per row: by inverse CDF (one uniform from the engine's generator), or for
     a seeded row by the exponential race argmax(p / q), q ~ Exp(1) drawn from its
     own generator, so its tokens do not depend on the batch. On CPU, unseeded rows
     with temperature alone draw in one fused pass (fused_cpu.softmax_draw). On GPU, a
     batch of greedy and plain-temperature rows is sampled on the device (only token ids
     are copied back); any other batch is copied to the host and takes the path above.

Knows nothing of scheduling: it sees one row per sampling request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scalellm.layers import fused_cpu
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.protocol.step import SampledLogprobs


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    token_ids: list[int]  # prompt + outputs (the worker's list, not copied)
    num_prompt_tokens: int
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None  # seeded requests only

    # NOTE: slices are taken only by penalties, so plain rows cost no copy per step.
    # Penalties count a resumed stream's earlier output (params.resume_tokens, the end
    # of the prompt) as output; min_tokens counts only this replica's (the gateway
    # lowered it by what was produced before).
    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens - self.params.resume_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens - self.params.resume_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1.0:
            continue
        out_ids = torch.tensor(row.output_token_ids, dtype=torch.long)
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool)
            seen[torch.tensor(row.prompt_token_ids, dtype=torch.long)] = True
            if out_ids.numel():
                seen[out_ids] = True
            x = logits[i]
            penalised = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            logits[i] = torch.where(seen, penalised, x)
        if out_ids.numel() and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(out_ids, minlength=vocab)[:vocab].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _min_tokens_ban(row: SamplingRow) -> list[int]:
    """Tokens this row may not sample yet: stop tokens (and EOS unless ignored) until it has
    min_tokens outputs."""
    p = row.params
    if row.num_output_tokens >= p.min_tokens:
        return []
    return list(p.stop_token_ids) + ([] if p.ignore_eos else list(row.eos_token_ids))


def _apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        banned = _min_tokens_ban(row)
        if banned:
            logits[i, torch.tensor(banned, dtype=torch.long)] = float("-inf")


def _is_plain(row: SamplingRow) -> bool:
    """Temperature only: no top-k, top-p or min-p filtering, no per-request generator."""
    p = row.params
    return row.generator is None and p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0


def _filter(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature and top-k/top-p/min-p over the random rows; returns probabilities."""
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype).unsqueeze(1)
    logits = logits / temps
    top_k = [r.params.top_k if r.params.top_k > 0 else logits.shape[1] for r in rows]
    top_p = [r.params.top_p for r in rows]
    if any(k < logits.shape[1] for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1]).unsqueeze(0)
        drop = ranks >= torch.tensor(top_k).unsqueeze(1)
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        cum = sorted_probs.cumsum(dim=-1)
        # drop a token once the mass before it already reaches top_p (always keep the first)
        drop |= (cum - sorted_probs) >= torch.tensor(top_p, dtype=logits.dtype).unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=probs.dtype).unsqueeze(1)
    if bool((min_p > 0).any()):
        keep = probs >= min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _draw(probs: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator | None) -> torch.Tensor:
    out = torch.empty(len(rows), dtype=torch.long)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        # Inverse CDF: one uniform per row against the row's cumulative probabilities (in
        # float64, so the buckets of tiny probabilities stay exact over a 150k vocab).
        # NOTE: measured at 64 rows x 49,152: ~8 ms, where the exponential race below
        # (one exponential draw per vocab entry) took 84 ms, 10% of a c=64 serving step.
        sub = probs if len(unseeded) == len(rows) else probs[unseeded]
        u = torch.rand(len(unseeded), 1, dtype=torch.float64, generator=generator)
        if fused_cpu.ready() and sub.device.type == "cpu" and sub.dtype == torch.float32:
            # one numba pass per row (block sums, then a walk): no [B, V] float64 copy
            out[unseeded] = fused_cpu.inverse_cdf_draw(sub, u.view(-1))
        else:
            cdf = sub.to(torch.float64).cumsum_(dim=-1)
            out[unseeded] = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
    # A seeded row races exponentials from its own generator, one per vocab entry: its
    # tokens depend only on its seed, and a resumed stream replays the draws exactly
    # (model_runner fast-forwards the generator by the tokens produced before).
    for i, row in enumerate(rows):
        if row.generator is not None:
            q = torch.empty(probs.shape[1]).exponential_(generator=row.generator)
            out[i] = (probs[i] / q).argmax()
    return out


def _needs_host(row: SamplingRow) -> bool:
    """Whether a row needs the full host path (anything beyond greedy or plain temperature)."""
    p = row.params
    if p.logprobs is not None or row.generator is not None:
        return True
    if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
        return True
    if _min_tokens_ban(row):
        return True
    return not (p.is_greedy or _is_plain(row))


def _sample_on_device(logits: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator | None) -> list[int]:
    """Greedy and plain-temperature rows where the logits lie (GPU): only the token ids
    cross to the host. A temperature row draws by the exponential race argmax(p / q),
    q ~ Exp(1), from a device generator seeded by the engine's (so a seeded engine repeats)."""
    temps = torch.tensor([0.0 if r.params.is_greedy else r.params.temperature for r in rows], dtype=torch.float32)
    greedy = logits.max(dim=-1).indices
    if bool((temps == 0).all()):
        return greedy.tolist()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    t = temps.to(logits.device, non_blocking=True)
    probs = (logits / t.clamp(min=1e-6).unsqueeze(1)).softmax(dim=-1)
    q = torch.empty_like(probs).exponential_(generator=gen)
    drawn = (probs / q).max(dim=-1).indices
    return torch.where(t == 0, greedy, drawn).tolist()


def sample(
    logits: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator | None = None
) -> tuple[list[int], list[SampledLogprobs | None]]:
    """logits: [B, V] float32 (modified in place). Returns token ids and logprobs per row.
    GPU logits: greedy and plain temperature rows are sampled there; otherwise the logits
    are copied to the host first."""
    if logits.device.type != "cpu":
        if not any(_needs_host(r) for r in rows):
            return _sample_on_device(logits, rows, generator), [None] * len(rows)
        logits = logits.cpu()
    want_logprobs = [r.params.logprobs for r in rows]
    raw_logprobs = logits.log_softmax(dim=-1) if any(n is not None for n in want_logprobs) else None

    _apply_min_tokens(logits, rows)
    _apply_penalties(logits, rows)

    tokens = torch.empty(len(rows), dtype=torch.long)
    greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
    random = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    if greedy:
        # NOTE: max(dim).indices, not argmax: the same first-maximum index, 2.6x faster on CPU
        # (64 x 49,152 float32: 0.9 vs 2.4 ms)
        tokens[greedy] = (logits[greedy] if len(greedy) < len(rows) else logits).max(dim=-1).indices
    if random and fused_cpu.ready() and logits.device.type == "cpu":
        # plain temperature sampling (no top-k/top-p/min-p, no seed): one numba pass per row
        # draws from softmax(logits / T) without materialising it (64 x 49,152: ~1 ms where
        # divide + softmax + draw took ~3.5 ms)
        plain = [i for i in random if _is_plain(rows[i])]
        if plain:
            sub = logits if len(plain) == len(rows) else logits[plain]
            temps = torch.tensor([rows[i].params.temperature for i in plain], dtype=torch.float32)
            u = torch.rand(len(plain), dtype=torch.float64, generator=generator)
            tokens[plain] = fused_cpu.softmax_draw(sub, temps, u)
            taken = set(plain)
            random = [i for i in random if i not in taken]
    if random:
        sub_rows = [rows[i] for i in random]
        sub = logits if len(random) == len(rows) else logits[random]
        tokens[random] = _draw(_filter(sub, sub_rows), sub_rows, generator)

    token_list = tokens.tolist()
    lps: list[SampledLogprobs | None] = [None] * len(rows)
    if raw_logprobs is not None:
        for i, n in enumerate(want_logprobs):
            if n is None:
                continue
            row_lp = raw_logprobs[i]
            top_vals, top_ids = (row_lp.topk(n) if n > 0 else (row_lp[:0], row_lp[:0].long()))
            lps[i] = SampledLogprobs(
                sampled_logprob=float(row_lp[token_list[i]]),
                top_token_ids=top_ids.tolist(),
                top_logprobs=top_vals.tolist(),
            )
    return token_list, lps
