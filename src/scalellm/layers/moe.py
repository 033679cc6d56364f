"""Mixture-of-experts MLP: a top-K router and E SwiGLU experts with stacked weights.

Shape letters: T tokens, E experts (all of them), K experts per token, M the model's
hidden width, I one expert's intermediate width, A token-expert assignments (T * K, or
the part of them that lands on this rank's experts).

The CPU path groups work by expert rather than by token:

    topk_ids [T, K] --flatten--> [A] --stable argsort--> assignments ordered by expert
                                                        | e0 e0 e0 | e1 | e3 e3 | ...
    x[token of each assignment] -> xs [A, M]            (one gather)
    for each expert e with n_e > 0:                      (a loop over E, never over T)
        ys[seg_e] = down_e(silu(gate_e(xs[seg_e])) * up_e(xs[seg_e]))
    out[token] += weight * ys                            (one weighted index_add)

Weights stay stacked in 3-D parameters so parallelism is a slice of them:

    w13_weight [E_local, 2 * I_local, M]   rows: [ gate (w1): I_local | up (w3): I_local ]
    w2_weight  [E_local, M, I_local]

    tensor parallel (default): every rank holds all E experts and I/tp of each one's
        intermediate width (gate/up rows and down columns, as the parallel linears do);
    expert parallel (expert_parallel=True, or by default when the parallel state says so):
        rank r holds the whole of experts
        [r * E/tp, (r + 1) * E/tp) and skips assignments to the others.
    Either way each rank's output is a partial sum that one all-reduce over the group
    completes, so the model code does not change.

The layer also counts tokens routed to each expert (the bincount the grouping needs
anyway), for load metrics: `read_expert_load(reset=True)`.

What this module does not know: checkpoint names (the model maps them onto
`weight_loader(param, tensor, shard_id, expert_id)`), process groups (it asks
parallel_state), or which model it sits in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.distributed.parallel_state import get_parallel_state, tensor_parallel_all_reduce
from scalellm.layers.linear import ReplicatedLinear
from scalellm.protocol.errors import ModelLoadError

# shard ids of expert tensors: Mixtral's names (w1 gate, w3 up, w2 down) plus the fused
# [gate | up] stack that transformers >= 5 keeps in memory (`experts.gate_up_proj`).
EXPERT_SHARD_IDS = ("w1", "w3", "w2", "w13")


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in float32, keep the K largest, optionally rescale them to
    sum to 1. Returns (weights [T, K] float32, expert ids [T, K] int64).

    renormalize=True is Mixtral's rule (equal to a softmax over the K chosen logits);
    Qwen3-MoE renormalises only when its config says norm_topk_prob.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K], [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    expert_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the experts [expert_start, expert_start + w13.shape[0]) on their tokens.

    x [T, M], w13 [E_local, 2 I, M], w2 [E_local, M, I], topk_* [T, K] with global ids.
    Returns (out [T, M] in x's dtype: the weighted sum over this rank's experts only,
    counts [E] int64: assignments per expert over all E experts).
    """
    top_k = topk_ids.shape[1]
    num_local = w13.shape[0]
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1)  # [T * K]
    counts = torch.bincount(flat_ids, minlength=num_experts)  # [E]
    order = torch.argsort(flat_ids, stable=True)  # [T * K] assignment ids, grouped by expert
    # NOTE: one host sync for the segment sizes; a GPU path would use a grouped GEMM instead.
    sizes = counts.tolist()
    lo = sum(sizes[:expert_start])
    local_sizes = sizes[expert_start : expert_start + num_local]
    order = order[lo : lo + sum(local_sizes)]  # [A] this rank's assignments
    token_ids = order // top_k  # [A]
    xs = x.index_select(0, token_ids)  # [A, M]
    ys = torch.empty_like(xs)  # [A, M]
    start = 0
    for e, n in enumerate(local_sizes):
        if n == 0:
            continue
        seg = xs[start : start + n]  # [n, M]
        gate_up = F.linear(seg, w13[e])  # [n, 2I]
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        ys[start : start + n] = F.linear(h, w2[e])  # [n, M]
        start += n
    weights = topk_weights.reshape(-1).index_select(0, order)  # [A]
    ys = (ys.float() * weights.unsqueeze(1)).to(x.dtype)  # [A, M], weighted in float32 like the reference
    out = torch.zeros_like(x)  # [T, M]
    out.index_add_(0, token_ids, ys)
    return out, counts


class FusedMoE(nn.Module):
    """Router (`gate`, replicated) + E SwiGLU experts stacked in `w13_weight`/`w2_weight`."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        dtype: torch.dtype | None = None,
        *,
        expert_parallel: bool | None = None,
        track_expert_load: bool = True,
    ) -> None:
        super().__init__()
        state = get_parallel_state()
        self.rank, self.size = state.tp_rank, state.tp_size
        if expert_parallel is None:  # the engine's choice (--enable-expert-parallel)
            expert_parallel = state.expert_parallel
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.expert_parallel = expert_parallel
        if expert_parallel:
            if num_experts % self.size:
                raise ModelLoadError(f"{num_experts} experts are not divisible by expert-parallel size {self.size}")
            self.num_local_experts = num_experts // self.size
            self.expert_start = self.rank * self.num_local_experts
            self.intermediate_size = intermediate_size
            self.inter_start = 0
        else:
            if intermediate_size % self.size:
                raise ModelLoadError(
                    f"expert intermediate size {intermediate_size} is not divisible by tensor-parallel size {self.size}"
                )
            self.num_local_experts = num_experts
            self.expert_start = 0
            self.intermediate_size = intermediate_size // self.size  # per rank
            self.inter_start = self.rank * self.intermediate_size
        e, i = self.num_local_experts, self.intermediate_size
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, dtype=dtype)
        self.gate.set_int8 = None  # type: ignore[assignment]  # NOTE: routing stays exact under int8
        self.w13_weight = nn.Parameter(torch.empty(e, 2 * i, hidden_size, dtype=dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(e, hidden_size, i, dtype=dtype), requires_grad=False)
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        # tokens routed per expert since the last read; a buffer so it follows .to(device)
        load = torch.zeros(num_experts, dtype=torch.int64) if track_expert_load else None
        self.register_buffer("expert_load", load, persistent=False)

    # -- loading ---------------------------------------------------------------------
    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None, expert_id: int | None = None
    ) -> None:
        """Copy this rank's part of a checkpoint tensor.

        expert_id=None: `loaded` stacks all E experts along dim 0 (w1/w3 [E, I, M],
        w13 [E, 2I, M], w2 [E, M, I]). Otherwise `loaded` is expert `expert_id`'s 2-D
        matrix; experts owned by another rank are skipped.
        """
        if shard_id not in EXPERT_SHARD_IDS:
            raise ModelLoadError(f"expert weight needs a shard id in {EXPERT_SHARD_IDS}, got {shard_id!r}")
        if expert_id is None:
            if loaded.dim() != 3 or loaded.shape[0] != self.num_experts:
                raise ModelLoadError(
                    f"stacked expert tensor ({shard_id}) has shape {tuple(loaded.shape)}, "
                    f"expected {self.num_experts} experts along dim 0"
                )
            for e in range(self.expert_start, self.expert_start + self.num_local_experts):
                self._load_expert(param, loaded[e], str(shard_id), e)
            return
        if not 0 <= expert_id < self.num_experts:
            raise ModelLoadError(f"expert id {expert_id} is out of range for {self.num_experts} experts")
        local = expert_id - self.expert_start
        if 0 <= local < self.num_local_experts:
            self._load_expert(param, loaded, str(shard_id), expert_id)

    def _load_expert(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        i, start, hidden = self.intermediate_size, self.inter_start, self.w2_weight.shape[1]
        full_i = i if self.expert_parallel else i * self.size
        expected = {"w1": (full_i, hidden), "w3": (full_i, hidden), "w13": (2 * full_i, hidden), "w2": (hidden, full_i)}
        if tuple(loaded.shape) != expected[shard_id]:
            raise ModelLoadError(
                f"expert {expert_id} {shard_id}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                f"expected {expected[shard_id]}"
            )
        target = param.data[expert_id - self.expert_start]  # [2I, M] or [M, I] of this rank
        if shard_id == "w2":
            target.copy_(loaded.narrow(1, start, i))  # this rank's input columns
            return
        if shard_id in ("w1", "w13"):
            target[:i].copy_(loaded.narrow(0, start, i))  # gate rows
        if shard_id in ("w3", "w13"):
            up = loaded if shard_id == "w3" else loaded[full_i:]
            target[i:].copy_(up.narrow(0, start, i))  # up rows

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x)  # [T, E]
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)  # [T, K]
        out, counts = fused_experts(
            x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.num_experts, self.expert_start
        )  # [T, M], [E]
        if self.expert_load is not None:
            self.expert_load += counts
        return tensor_parallel_all_reduce(out) if self.size > 1 else out

    def read_expert_load(self, reset: bool = True) -> list[int]:
        """Tokens routed to each of the E experts since the last reset (every rank counts
        all E: routing is replicated). Empty when the layer was built without tracking."""
        if self.expert_load is None:
            return []
        counts = self.expert_load.tolist()
        if reset:
            self.expert_load.zero_()
        return counts
