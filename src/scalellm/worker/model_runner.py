"""Turns one scheduled step into tensors, runs the model and samples.

Keeps per-request state between steps (token ids, block table, seeded generator)
so the scheduler sends each request in full only once. Knows nothing of queues
or policies: it does what the SchedulerOutput says.

It is also the in-process executor of the engine core (execute, read_expert_load,
check_health, shutdown). Under tensor parallelism every rank runs one; only the
driver's (rank 0) samples, the others are told the sampled tokens with the next step
(`add_sampled_tokens`), so tokens are identical by construction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from scalellm.layers import fused_cpu, paged_attention_triton
from scalellm.layers.attention import AttentionMetadata, ForwardBatch, PrefillChunk
from scalellm.layers.linear import all_linears_on_amx
from scalellm.memory import drop_library_pages, no_huge_pages, release_pages
from scalellm.models.args import ModelArgs
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.protocol.step import ModelRunnerOutput, NewRequestData, SchedulerOutput
from scalellm.worker.cuda_graph import DecodeGraphs
from scalellm.worker.sampler import SamplingRow, sample

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestState:
    request_id: str
    token_ids: list[int]  # prompt + outputs
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    eos_token_ids: frozenset[int]


@dataclass(slots=True)
class StepLists:
    """One step's inputs, in the step's token layout (decodes first, then chunks)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)  # block table per decode
    decode_lens: list[int] = field(default_factory=list)  # context length per decode
    prefills: list[PrefillChunk] = field(default_factory=list)
    prefill_tables: list[list[int]] = field(default_factory=list)  # block table per chunk (Triton path)
    sample_ids: list[str] = field(default_factory=list)  # requests that sample this step
    sample_rows: list[int] = field(default_factory=list)  # their last token's row
    num_pad_tokens: int = 0  # padding rows at the end (ModelRunner._pad)


def padded_rows(num_tokens: int) -> int:
    """The row count a CPU step runs at: up to 64 tokens as they are (decode batches, whose
    sizes recur), then rounded up to a multiple of 32 (to 512) or of 64.

    NOTE: oneDNN builds (JIT) a primitive per GEMM shape on its first use and caches it: a
    new row count cost SmolLM2's layer GEMMs 1-3 ms each at 64 rows and 3-15 ms at ~4,000
    (once per shape, not per layer), and a stream of 4,096-token prefill steps of new sizes
    ran at 629 ms a step against 605 ms padded (2-core AMX Xeon). Prefill and mixed steps
    come in all sizes; buckets make them recur, for <= 31 (then <= 63) rows of waste."""
    if num_tokens <= 64:
        return num_tokens
    step = 32 if num_tokens <= 512 else 64
    return -(-num_tokens // step) * step


@dataclass(slots=True)
class StepTimings:
    """Cumulative seconds spent in each phase (for profiling)."""

    prepare: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    num_steps: int = 0


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros whose CPU pages are mapped only when first written (calloc of fresh mmap'd pages),
    so the KV cache costs resident memory as it fills, not all at start-up."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    # NOTE: torch.zeros memsets (touches) every page; numpy's zeros uses calloc, which for
    # large blocks maps fresh zero pages without writing them.
    raw = np.zeros(nbytes, dtype=np.uint8)
    no_huge_pages(raw.ctypes.data, nbytes)  # resident as the blocks in use, not in 2 MiB steps
    return torch.from_numpy(raw).view(dtype).view(shape)


def start_cpu_kernels(model: nn.Module, args: ModelArgs, dtype: torch.dtype, device: torch.device,
                      kv_cache_dtype: str = "auto") -> bool:
    """Start compiling (or loading from numba's disk cache) the CPU kernels this model's steps
    use, on a background thread; a second call for the same kernels starts nothing. Returns
    whether there are such kernels (CPU, float32 or bfloat16 activations).

    NOTE: called before the weights are loaded, the ~1.5-2 s of importing numba and loading
    its cached kernels overlaps the load; started after it, an int8 server answered its first
    requests for ~2 s after /ready on the torch stand-ins, whose roundings can tip a
    near-tied greedy token (benchmarks/README.md, session 14)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    attn = model.model.layers[0].self_attn  # head counts per rank
    fused_cpu.warm_up_in_background(dtype, args.head_dim, attn.num_heads, attn.num_kv_heads, kv_cache_dtype == "int8")
    return True


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        args: ModelArgs,
        *,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int = 0,
        is_driver: bool = True,
        cuda_graph_max_batch: int = 0,
        max_model_len: int | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.model = model
        self.is_driver = is_driver  # False: a tensor-parallel follower rank (forward only, no sampling)
        self.args = args
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        self.states: dict[str, RequestState] = {}
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.timings = StepTimings()
        attn = model.model.layers[0].self_attn  # head counts per rank
        # One block more than the pool hands out: the scratch block that padding rows write
        # to (CUDA graphs' batches, see cuda_graph.py; CPU steps' row buckets, `padded_rows`).
        self.scratch_block = num_blocks
        cache_blocks = num_blocks + 1
        shape = (2, cache_blocks, block_size, attn.num_kv_heads, args.head_dim)
        # kv_cache_dtype "int8": 8-bit codes with a float32 scale per (token, KV head) row (kv_quant)
        self.kv_codes = kv_cache_dtype == "int8"
        self.kv_caches = [lazy_zeros(shape, torch.int8 if self.kv_codes else dtype, device)
                          for _ in range(args.num_layers)]
        self.kv_scales = [lazy_zeros(shape[:-1], torch.float32, device) for _ in range(args.num_layers)] \
            if self.kv_codes else None
        self._prefault_next = 0 if device.type == "cpu" else num_blocks  # next block prefault_kv touches
        # CPU steps run at bucketed row counts (`padded_rows`) for oneDNN's per-shape kernels;
        # not MoE models, whose routers would count the padding rows as expert load, nor models
        # whose every GEMM is the AMX kernel (no per-shape kernels: padding would be waste)
        self.pad_rows = (device.type == "cpu" and not hasattr(model, "read_expert_load")
                         and not all_linears_on_amx(model))
        # CPU kernels being compiled for this dtype (started here unless `start_cpu_kernels` was
        # called before the weights were loaded)
        self._compiling = dtype if start_cpu_kernels(model, args, dtype, device, kv_cache_dtype) else None
        # decode attention through block tables (Triton) where it runs: on CUDA
        self.use_block_tables = paged_attention_triton.supports(
            self.kv_caches[0][0], attn.num_heads, attn.num_kv_heads, args.head_dim, block_size)
        if device.type == "cuda":
            # NOTE: cuDNN's attention builds an execution plan per new prefill shape; on an H200 that
            # stalled single steps for 1.8-2.6 s mid-serving (c=256, chunked prefill). Flash and
            # memory-efficient attention have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.graphs: DecodeGraphs | None = None
        if cuda_graph_max_batch > 0 and device.type == "cuda" and self.use_block_tables:
            self.graphs = DecodeGraphs(model, self.kv_caches, max_batch=cuda_graph_max_batch,
                                       max_model_len=max_model_len or args.max_position_embeddings,
                                       block_size=block_size, scratch_block=self.scratch_block, device=device)
            self.graphs.capture()
        elif cuda_graph_max_batch > 0 and device.type == "cuda":
            logger.warning("CUDA graphs off: the Triton decode attention does not run here (is triton installed?)")

    # -- state -----------------------------------------------------------------
    def _add(self, data: NewRequestData) -> None:
        old = self.states.get(data.request_id)
        gen = old.generator if old is not None else None
        if gen is None and data.sampling_params.seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(data.sampling_params.seed + data.seed_offset)
            if data.sampling_params.resume_tokens and not data.sampling_params.is_greedy:
                # NOTE: a resumed stream continues the same random sequence: each sampled
                # token drew one vocab-sized exponential vector (sampler._draw); skip them.
                for _ in range(data.sampling_params.resume_tokens):
                    torch.empty(self.args.vocab_size).exponential_(generator=gen)
        self.states[data.request_id] = RequestState(
            request_id=data.request_id,
            token_ids=list(data.all_token_ids),
            num_prompt_tokens=data.num_prompt_tokens,
            params=data.sampling_params,
            block_ids=list(data.block_ids),
            num_computed_tokens=data.num_computed_tokens,
            generator=gen,
            eos_token_ids=data.eos_token_ids,
        )

    def _update_states(self, sched: SchedulerOutput) -> None:
        for request_id in sched.finished_request_ids:
            self.states.pop(request_id, None)
        for data in sched.new_requests:
            self._add(data)
        for cached in sched.cached_requests:
            state = self.states[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def add_sampled_tokens(self, sampled_token_ids: dict[str, int]) -> None:
        """Follower ranks: append the tokens the driver sampled in the previous step."""
        for request_id, token in sampled_token_ids.items():
            state = self.states.get(request_id)
            if state is not None:
                state.token_ids.append(token)

    # -- one step ----------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        t0 = time.perf_counter()
        self._update_states(sched)
        if sched.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        st = self._collect(sched, self._order(sched))
        sample_ids = st.sample_ids
        graphs = self.graphs
        if graphs is not None and not st.prefills and graphs.fits(len(st.input_ids), st.decode_tables):
            t1 = time.perf_counter()
            logits = graphs.run(st.input_ids, st.positions, st.slot_mapping, st.decode_lens, st.decode_tables)
            if len(st.sample_rows) < len(st.input_ids):  # a 1-token chunk that does not end its prompt
                logits = logits[st.sample_rows]
        else:
            if self.pad_rows:
                self._pad(st)
            input_ids, positions, batch = self._tensors(st)
            t1 = time.perf_counter()
            hidden = self.model(input_ids, positions, batch)  # [T, E]
            logits = self.model.compute_logits(hidden[st.sample_rows])  # [B, V] float32 (a collective under TP)
        t2 = time.perf_counter()
        tokens, lps = [], []
        if self.is_driver:
            rows = [self._sampling_row(self.states[r]) for r in sample_ids]
            tokens, lps = sample(logits, rows, self.generator)
        out = ModelRunnerOutput(sampled_token_ids={})
        for request_id, token, lp in zip(sample_ids, tokens, lps):
            self.states[request_id].token_ids.append(token)
            out.sampled_token_ids[request_id] = token
            if lp is not None:
                out.logprobs[request_id] = lp
        for request_id, n in sched.num_scheduled_tokens.items():
            self.states[request_id].num_computed_tokens += n
        t3 = time.perf_counter()
        tm = self.timings
        tm.prepare += t1 - t0
        tm.forward += t2 - t1
        tm.sample += t3 - t2
        tm.num_steps += 1
        return out

    # -- executor interface (in-process: nothing else can fail or needs stopping) ----
    def read_expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert of each MoE layer since the last read; {} for dense models."""
        read = getattr(self.model, "read_expert_load", None)
        return read(reset=True) if read is not None else {}

    def kernels_ready(self) -> bool:
        """Whether the background compilation of the CPU kernels (if any) is over."""
        return self._compiling is None or fused_cpu.warmed_up(self._compiling, self.kv_codes)

    def drop_start_up_pages(self) -> int:
        """CPU: unmap torch's resident code pages (libtorch*), most of which only its import
        and the model's load ran; returns the bytes advised. The engine calls this before its
        warm-up step, which faults back (from the page cache) the code a step runs.

        NOTE: on the AMX Xeon, SmolLM2: torch's resident code 113 -> 34 MiB right after,
        52-57 MiB after the warm-up step and later steps."""
        if self.device.type != "cpu":
            return 0
        return drop_library_pages("libtorch", code_only=True)

    def prefault_kv(self, max_blocks: int = 8, upto: int | None = None) -> bool:
        """Fault in the pages of the next `max_blocks` KV blocks (by id: the order the block
        pool first hands them out) of every layer, below block `upto` (the pool's resident
        budget; None: all), leaving their contents as they are (each page's first byte is
        rewritten with itself); returns whether blocks remain. For idle time only: never
        while a step runs.

        NOTE: the cache is mapped lazily (RSS grows as it fills), and on these VMs a first
        write to a page costs 10-300 us; until every page had been touched once, serving
        paid it inside steps: ~7 ms a 64-decode step, 165 ms a 2,048-token prefill step
        (a fresh server's c=64 benchmark: 655 out tok/s with the prefault, 618 without)."""
        end = self.num_blocks if upto is None else min(upto, self.num_blocks)
        b0 = self._prefault_next
        if b0 >= end:
            return False
        b1 = min(end, b0 + max_blocks)
        for cache in self.kv_caches + (self.kv_scales or []):
            for half in cache[:, b0:b1]:  # K, then V: each a contiguous run of whole blocks
                raw = half.reshape(-1).view(torch.uint8).numpy()
                raw[::4096] |= 0  # one byte a page (a plain self-assignment is skipped by numpy)
                raw[-1:] |= 0  # and the run's last page
        self._prefault_next = b1
        return b1 < end

    def release_kv(self, lo: int, hi: int) -> int:
        """Hand back the pages that lie wholly inside blocks [lo, hi) of every layer's cache
        (MADV_DONTNEED: they read as zeros when next touched; the pool hands these blocks out
        as fresh, written before read); returns the bytes released. CPU only (0 elsewhere)."""
        if self.device.type != "cpu" or hi <= lo:
            return 0
        released = 0
        for cache in self.kv_caches + (self.kv_scales or []):
            for half in cache[:, lo:hi]:  # K, then V: each a contiguous run of whole blocks
                released += release_pages(half.data_ptr(), half.numel() * half.element_size())
        return released

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def _order(self, sched: SchedulerOutput) -> list[str]:
        """Single-token requests first (batched decode attention), then chunks."""
        ids = list(sched.num_scheduled_tokens)
        return [r for r in ids if sched.num_scheduled_tokens[r] == 1] + [
            r for r in ids if sched.num_scheduled_tokens[r] > 1
        ]

    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end): only the new tokens of a step (Python is fine)."""
        s = self.block_size
        return [block_ids[p // s] * s + p % s for p in range(start, end)]

    def _context_slots(self, tables: list[list[int]], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of each request's whole context, from its block table with tensor ops (no
        per-token Python work: contexts grow every step). Returns slots [B, Lmax] padded
        with slot 0 and a mask [B, Lmax] of the real positions."""
        s = self.block_size
        max_blocks = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])  # [B, nblocks]
        slots = (table.unsqueeze(-1) * s + torch.arange(s)).view(len(tables), -1)  # [B, nblocks*S]
        lmax = max(lengths)
        mask = torch.arange(lmax).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # [B, Lmax]
        return slots[:, :lmax].masked_fill(~mask, 0), mask

    def _collect(self, sched: SchedulerOutput, order: list[str]) -> StepLists:
        """The step's inputs as lists (the per-request Python work of a step)."""
        st = StepLists()
        for request_id in order:
            state = self.states[request_id]
            n = sched.num_scheduled_tokens[request_id]
            start = state.num_computed_tokens
            end = start + n
            q_start = len(st.input_ids)
            st.input_ids.extend(state.token_ids[start:end])
            st.positions.extend(range(start, end))
            st.slot_mapping.extend(self._slots(state.block_ids, start, end))
            if n == 1:
                st.decode_tables.append(state.block_ids)
                st.decode_lens.append(end)
            else:
                ctx = None
                if self.use_block_tables:
                    st.prefill_tables.append(state.block_ids)  # the kernel reads K/V through it
                elif start:
                    ctx = self._context_slots([state.block_ids], [end])[0][0].to(self.device)  # [ctx_len]
                st.prefills.append(PrefillChunk(q_start=q_start, q_len=n, ctx_len=end, ctx_slots=ctx))
            if end == len(state.token_ids):
                st.sample_ids.append(request_id)
                st.sample_rows.append(len(st.input_ids) - 1)
        return st

    def _pad(self, st: StepLists) -> None:
        """Append padding rows up to `padded_rows`: token 0 at position 0, K/V written to the
        scratch block; no chunk or decode covers them and nothing samples from them."""
        n = padded_rows(len(st.input_ids)) - len(st.input_ids)
        st.num_pad_tokens = n
        st.input_ids.extend([0] * n)
        st.positions.extend([0] * n)
        st.slot_mapping.extend([self.scratch_block * self.block_size] * n)

    def _tensors(self, st: StepLists) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch]:
        dev = self.device
        md = AttentionMetadata(slot_mapping=torch.tensor(st.slot_mapping, device=dev),
                               num_decode_tokens=len(st.decode_tables), decode_slots=None, decode_mask=None,
                               prefills=st.prefills, num_pad_tokens=st.num_pad_tokens)
        if st.decode_tables and self.use_block_tables:
            md.block_tables = torch.from_numpy(paged_attention_triton.pack_block_tables(st.decode_tables)).to(dev)
            md.block_size = self.block_size
            # NOTE: int64 like the CUDA graphs' lengths: a Triton kernel is compiled per pointer
            # dtype, and int32 here compiled new variants mid-serving
            md.decode_lens = torch.tensor(st.decode_lens, dtype=torch.long, device=dev)
        elif st.decode_tables:
            md.decode_lens = torch.tensor(st.decode_lens, device=dev)
            slots, mask = self._context_slots(st.decode_tables, st.decode_lens)
            md.decode_slots = slots.to(dev)  # [Bd, Lmax]
            md.decode_mask = mask.view(len(st.decode_tables), 1, 1, -1).to(dev)  # [Bd, 1, 1, Lmax]
        if st.prefill_tables:
            md.prefill_tables = torch.from_numpy(paged_attention_triton.pack_block_tables(st.prefill_tables)).to(dev)
            md.prefill_meta = torch.tensor([[c.q_start for c in st.prefills], [c.q_len for c in st.prefills],
                                            [c.ctx_len for c in st.prefills]], dtype=torch.int32).to(dev)
            md.prefill_max_q = max(c.q_len for c in st.prefills)
            md.block_size = self.block_size
        batch = ForwardBatch(attn=md, kv_caches=self.kv_caches, kv_scales=self.kv_scales)
        return torch.tensor(st.input_ids, device=dev), torch.tensor(st.positions, device=dev), batch

    def _sampling_row(self, state: RequestState) -> SamplingRow:
        return SamplingRow(state.params, state.token_ids, state.num_prompt_tokens, state.eos_token_ids, state.generator)
