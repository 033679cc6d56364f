"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice
of the vocabulary; embedding outputs are summed, logits gathered."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.distributed.parallel_state import (
    get_parallel_state,
    tensor_parallel_all_gather,
    tensor_parallel_all_reduce,
)
from scalellm.layers import fused_cpu
from scalellm.layers.bf16_gemm import Bf16Blocks
from scalellm.layers.linear import OwnWeight, PackedWeight, linear_packed, pack_bf16, packed_nbytes
from scalellm.protocol.errors import ModelLoadError
from scalellm.quant.int8 import Int8Weight


def _block_rows(blocks32: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of the [V, E] bf16 matrix whose GEMM blocks are `blocks32`
    ([Np/64, E/2, 64] int32, each pair of E one int32): row v is block v // 64, channel
    v % 64 -> [..., E] bf16."""
    return blocks32[ids >> 6, :, ids & 63].view(torch.bfloat16)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        tp = get_parallel_state()
        self.tp_rank, self.tp_size = tp.tp_rank, tp.tp_size
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.tp_size)
        self.vocab_start = tp.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape[1] != param.shape[1] or loaded.shape[0] != self.vocab_size:
            raise ModelLoadError(
                f"embedding: checkpoint tensor has shape {tuple(loaded.shape)}, "
                f"expected ({self.vocab_size}, {param.shape[1]})"
            )
        rows = min(self.shard_size, self.vocab_size - self.vocab_start)
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.vocab_start : self.vocab_start + rows])

    # [Np/64, E/2, 64] int32 (pairs of bf16): a tied LM head's GEMM blocks, read in place of
    # `weight` once `read_from_blocks` dropped it
    blocks32: torch.Tensor | None = None

    def read_from_blocks(self, blocks: Bf16Blocks) -> int:
        """Drop the plain table and gather rows from the tied LM head's GEMM blocks instead
        (one copy of the vocabulary's weights, not two: 54 MiB on SmolLM2); returns the bytes
        freed. One rank, bf16 only. The `weight` attribute becomes None, here and on the head
        that shared it (ParallelLMHead reads the blocks then)."""
        if self.tp_size != 1 or blocks.n != self.vocab_size or self.weight.dtype != torch.bfloat16 \
                or blocks.k != self.weight.shape[1]:
            raise ValueError("read_from_blocks: a one-rank bf16 table and its [V, E] blocks only")
        freed = self.weight.numel() * self.weight.element_size()
        self.blocks32 = blocks.blocks.view(torch.int32).squeeze(-1)
        self.weight = None  # type: ignore[assignment]
        return freed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.blocks32 is not None:
            return _block_rows(self.blocks32, input_ids)  # [T, E]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        out.masked_fill_(mask.unsqueeze(-1), 0)
        return tensor_parallel_all_reduce(out)


def _logits_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [B, E] @ weight[V, E].T in float32 -> [B, V] (contiguous)."""
    if weight.device.type == "cpu" and hidden.shape[0] > 1:
        # NOTE: on CPU, torch 2.13's F.linear with this tall weight (49k x 576) ran 1.6-2.3x
        # slower than W @ h.T (64 rows: 71-86 vs 37-45 ms incl. the transpose copy; 1 row: same).
        return torch.mm(weight, hidden.t()).t().contiguous()
    return F.linear(hidden, weight)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the full vocabulary (float32)."""

    # Candidates re-scored in float32 when the weights are 16-bit or int8 (see compute_logits).
    num_rescored: int = 32
    qweight: Int8Weight | None = None  # set by set_int8(); `weight` stays (it may be the tied embedding)
    weight32: torch.Tensor | None = None  # set by set_fp32_compute(); `weight` stays (as for int8)
    packed: PackedWeight | None = None  # set by set_packed(); `weight` stays (embedding, re-scoring)

    def set_packed(self) -> int:
        """Logits from a prepacked copy of the bf16 weight (see LinearBase.set_packed); returns
        the bytes added."""
        self.packed = pack_bf16(self.weight)
        return packed_nbytes(self.packed)

    def share_with(self, embedding: VocabParallelEmbedding) -> int:
        """A tied head whose prepacked copy is our GEMM's blocks keeps only them: the embedding
        gathers its rows from them and re-scoring reads them (`read_from_blocks`); returns the
        bytes freed (0 where the weight is not tied, or not packed so)."""
        if embedding.weight is not self.weight or not isinstance(self.packed, Bf16Blocks) or self.tp_size != 1:
            return 0
        freed = embedding.read_from_blocks(self.packed)
        self.weight, self.blocks32 = None, embedding.blocks32  # type: ignore[assignment]
        return freed

    def _rows_source(self) -> torch.Tensor:
        """The [V, E] bf16/float32 weight, or (shared with the embedding) the GEMM's blocks."""
        return self.weight if self.weight is not None else self.packed.blocks  # type: ignore[union-attr]

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """weight[idx] (any index shape) -> [..., E] in the weight's dtype."""
        return self.weight[idx] if self.weight is not None else _block_rows(self.blocks32, idx)  # type: ignore[arg-type]

    def set_int8(self, act_amax: torch.Tensor | None = None, keep_weight: bool = True, onednn: bool = False) -> int:
        """Compute logits with an int8 copy of the weight; the top candidates are re-scored exactly.
        The float weight always stays (re-scoring, the tied embedding): keep_weight is moot.
        onednn (the layers' int8-rows chain, which does not reach the LM head): nothing changes,
        the logits stay in the model's dtype (their int8 error has no bound that re-scoring
        could rely on: up to 12% of the row maximum on SmolLM2); returns 0."""
        if onednn:
            return 0
        self.qweight = Int8Weight(self.weight, act_amax)
        return -self.qweight.nbytes  # the float weight stays for re-scoring (and the tied embedding)

    def set_fp32_compute(self) -> int:
        """Logits from a float32 copy of the bf16 weight's values (see LinearBase.set_fp32_compute):
        exact float32 logits, so no re-scoring. Returns the bytes added."""
        self.weight32 = self.weight.detach().float()
        return self.weight32.numel() * 4

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        exact = True  # float32 logits of the float32 (or bf16-valued, weight32) weight
        bf16 = False  # from a bf16 GEMM: within |exact| * 2^-8 (re-scored near the maximum)
        if self.weight32 is not None:
            logits = _logits_fp32(hidden.float(), self.weight32)  # [B, V/tp]
        elif self.qweight is not None and self.packed is None:
            # (with a prepacked bf16 copy too, the bf16 GEMM: at 64 rows of SmolLM2's vocabulary it
            # took 6 ms a step, int8 10.4 ms, whose float32 input and output passes dominate)
            logits, exact = self.qweight(hidden.float()), False  # [B, V/tp] float32
        elif self.weight is not None and self.weight.dtype == torch.float32:
            logits = _logits_fp32(hidden.float(), self.weight)  # [B, V/tp]
        elif isinstance(self.packed, OwnWeight):  # float32 out of the accumulators: the bf16 inputs' error only
            logits, exact, bf16 = linear_packed(hidden.to(torch.bfloat16), self.packed, None, out_float32=True), False, True
        elif self.packed is not None:
            logits, exact, bf16 = linear_packed(hidden.to(self.weight.dtype), self.packed, None).float(), False, True
        else:
            logits, exact, bf16 = F.linear(hidden.to(self.weight.dtype), self.weight).float(), False, True
        if bf16 and logits.shape[0] > 0 and logits.device.type == "cpu" and fused_cpu.ready():
            # bf16 logits are within |exact| * 2^-8 of the exact ones: every token within 4x that
            # of its row's maximum is recomputed exactly (numba, in place; typically a few per row),
            # so the maximum, hence greedy, is exact. 0.5 ms at 64 rows where topk + gather +
            # rescoring took ~4 ms. (int8 logits carry no such bound: they take the top-k below.)
            fused_cpu.rescore_near_max(logits, hidden.float(), self._rows_source(), 2.0**-6, 1e-3)
        elif not exact and logits.shape[0] > 0:
            # NOTE: a bf16 (or int8) GEMM rounds its outputs to 8 mantissa bits: ~0.1 at a logit of 25,
            # enough to flip greedy picks (seen on SmolLM2: 25.33 vs 25.24 both became 25.375).
            # Re-scoring the top candidates in float32 costs B*k*E MACs and makes the top of
            # the distribution, where greedy and top-k/top-p act, exact.
            k = min(self.num_rescored, logits.shape[1])
            idx = logits.topk(k, dim=-1).indices  # [B, k]
            rescored = torch.einsum("be,bke->bk", hidden.float(), self._rows(idx).float())
            logits.scatter_(1, idx, rescored)
        if self.tp_size > 1:
            logits = tensor_parallel_all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size]  # [B, V] float32
