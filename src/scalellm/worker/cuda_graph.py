"""CUDA graphs for decode steps: the whole forward (embedding, every layer, final norm,
LM head) of a decode-only step is captured once per batch-size bucket and replayed,
so a step costs a few host-to-device copies and one graph launch instead of hundreds
of kernel launches from Python.

Static inputs, shared by every bucket's graph (a bucket uses their first rows):
    meta   [4, Bmax] int64   token ids, positions, KV slots, context lengths
    tables [Bmax, W] int32   block tables (W = blocks of the longest allowed context)
A step of n decodes runs the smallest bucket b >= n; its rows n..b-1 are padding that
write their K/V to a scratch block no request owns and attend to that one slot. Only
the columns of the tables the longest context needs are copied each step; the kernel
never reads a row past ceil(len / block size).

Knows nothing of requests: it is handed lists of ints and returns logits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from scalellm.layers.attention import AttentionMetadata, ForwardBatch
from scalellm.layers.paged_attention_triton import pack_block_tables

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], *, max_batch: int, max_model_len: int,
                 block_size: int, scratch_block: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        self.buckets = sorted({b for b in BUCKETS if b < max_batch} | {min(max_batch, BUCKETS[-1])})
        bmax = self.buckets[-1]
        self.width = -(-max_model_len // block_size)
        self.meta = torch.zeros(4, bmax, dtype=torch.long, device=device)
        self.tables = torch.full((bmax, self.width), scratch_block, dtype=torch.int32, device=device)
        self._host = torch.zeros(4, bmax, dtype=torch.long, pin_memory=device.type == "cuda")
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def _batch(self, b: int) -> ForwardBatch:
        md = AttentionMetadata(slot_mapping=self.meta[2, :b], num_decode_tokens=b, decode_slots=None,
                               decode_mask=None, decode_lens=self.meta[3, :b], block_tables=self.tables[:b],
                               block_size=self.block_size)
        return ForwardBatch(attn=md, kv_caches=self.kv_caches)

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.meta[0, :b], self.meta[1, :b], self._batch(b))
        return self.model.compute_logits(hidden)  # [b, V] float32

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's graph (largest first, all in one memory pool)."""
        t0 = time.perf_counter()
        self.stage([], [], [], [], [], self.max_batch)  # every row padding
        pool = None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for b in reversed(self.buckets):
            with torch.cuda.stream(stream):
                self._forward(b)  # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        logger.info("CUDA graphs captured for %d decode batch sizes (1..%d) in %.1fs",
                    len(self.buckets), self.max_batch, self.capture_seconds)

    def fits(self, n: int, tables: Sequence[Sequence[int]]) -> bool:
        return n <= self.max_batch and max(len(t) for t in tables) <= self.width

    def stage(self, input_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int], lens: Sequence[int],
              tables: Sequence[Sequence[int]], bucket: int) -> None:
        """Copy n = len(input_ids) sequences' inputs into the static buffers' first `bucket`
        rows; rows n..bucket-1 are padding (token 0 at position 0, writing to and attending
        the scratch block's first slot)."""
        n = len(input_ids)
        host = self._host[:, :bucket]
        host[0, :n] = torch.as_tensor(input_ids, dtype=torch.long)
        host[1, :n] = torch.as_tensor(positions, dtype=torch.long)
        host[2, :n] = torch.as_tensor(slots, dtype=torch.long)
        host[3, :n] = torch.as_tensor(lens, dtype=torch.long)
        host[0:2, n:] = 0
        host[2, n:] = self.scratch_block * self.block_size
        host[3, n:] = 1
        tab = pack_block_tables(list(tables), bucket, self.scratch_block)
        self.meta[:, :bucket].copy_(host, non_blocking=True)
        self.tables[:bucket, : tab.shape[1]].copy_(torch.from_numpy(tab), non_blocking=True)

    def run(self, input_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int], lens: Sequence[int],
            tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """One decode step of n = len(input_ids) sequences (`fits` must hold) -> logits
        [n, V] (a view of the graph's output, valid until the next run)."""
        n = len(input_ids)
        b = self.bucket_for(n)
        assert b is not None
        self.stage(input_ids, positions, slots, lens, tables, b)
        self.graphs[b].replay()
        return self.outputs[b][:n]
