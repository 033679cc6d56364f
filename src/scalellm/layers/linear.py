"""Linear layers that own their tensor-parallel sharding and weight loading.

Each parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` that
copies the slice of a full checkpoint tensor that belongs to this rank, so model
files stay pure math and a loader stays a loop over (name, tensor) pairs.

    QKVParallelLinear output rows (per rank):  [ q: H/tp*D | k: Hkv/tp*D | v: Hkv/tp*D ]
    MergedColumnParallelLinear (gate_up):      [ gate: I/tp | up: I/tp ]
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.distributed.parallel_state import get_parallel_state, tensor_parallel_all_reduce
from scalellm.layers import amx_gemm, bf16_gemm, fused_cpu
from scalellm.layers.amx_gemm import AmxWeight
from scalellm.layers.bf16_gemm import Bf16Blocks
from scalellm.layers.int8_rows import Int8Rows, ScaledRows, quantise
from scalellm.layers.int_mm_backend import IntMmInt8Backend
from scalellm.protocol.errors import ModelLoadError
from scalellm.quant.fp8 import Fp8Weight
from scalellm.quant.int4 import Int4Weight
from scalellm.quant.int4 import supports as int4_supports
from scalellm.quant.int8 import Int8Backend, Int8Weight, qlinear_fast


def _check_shape(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ModelLoadError(f"{what}: checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    _check_shape(param, loaded, "weight")
    param.data.copy_(loaded)


@functools.cache
def onednn_packing_available() -> bool:
    """Whether oneDNN's prepacked linear runs bf16 here: this torch build has it (its x86 and
    arm64 CPU builds do) and the CPU passes oneDNN's bf16 checks (tried once on a tiny weight)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        w = torch.ones(8, 8, dtype=torch.bfloat16)
        return bool(linear_packed(torch.ones(2, 8, dtype=torch.bfloat16), pack_onednn(w), None)[0, 0] == 8)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def pack_onednn(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> oneDNN's blocked layout for `linear_packed` (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)


# oneDNN's blocked layout, AMX tiles (layers/amx_gemm.py) or our AVX-512 BF16 blocks (layers/bf16_gemm.py)
PackedWeight = torch.Tensor | AmxWeight | Bf16Blocks
OwnWeight = AmxWeight | Bf16Blocks  # a layout of our own kernels


def amx_takes(weight: torch.Tensor) -> bool:
    """Whether this bf16 weight goes to the AMX GEMM (layers/amx_gemm.py: an AMX CPU, a C
    compiler, SCALELLM_NO_AMX_GEMM unset; built and loaded on the first call, once per machine)."""
    return amx_gemm.load() and amx_gemm.supports(weight)


def pack_bf16(weight: torch.Tensor) -> PackedWeight:
    """weight [N, K] -> AMX tiles where the AMX GEMM takes it, else our AVX-512 BF16 GEMM's
    blocks where that takes it, else oneDNN's layout."""
    if amx_takes(weight):
        return amx_gemm.pack(weight)
    return bf16_gemm.pack(weight) if bf16_gemm.takes(weight) else pack_onednn(weight)


def all_linears_on_amx(model: nn.Module) -> bool:
    """Whether every linear and LM head of this model holds AMX tiles and no int8 weight (whose
    GEMM is oneDNN's or torch's): then no GEMM builds a kernel per row count."""
    gemms = [m for m in model.modules() if hasattr(m, "set_packed")]
    return bool(gemms) and all(isinstance(getattr(m, "packed", None), AmxWeight)
                               and getattr(m, "qweight", None) is None for m in gemms)


def packed_nbytes(packed: PackedWeight) -> int:
    return packed.nbytes if isinstance(packed, OwnWeight) else packed.numel() * packed.element_size()


def linear_packed(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                  out_float32: bool = False) -> torch.Tensor:
    """F.linear with a weight from `pack_bf16` or `pack_onednn`; x: [..., K]. out_float32 (our
    kernels only): the float32 sums, unrounded."""
    if isinstance(packed, AmxWeight):
        return amx_gemm.matmul(x, packed, bias, out_float32)
    if isinstance(packed, Bf16Blocks):
        return bf16_gemm.matmul(x, packed, bias, out_float32)
    assert not out_float32
    shape = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), packed, bias, "none", [], "")
    return y if len(shape) == 2 else y.view(*shape[:-1], y.shape[-1])


def silu_mul_packed(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for weights from `pack_onednn`; x: [T, K] -> [T, N]. Two
    GEMMs whose epilogues apply the activation and the product on the float32 accumulators
    (oneDNN post-ops), so the [T, 2N] gate|up output is never written nor read back."""
    g = torch.ops.mkldnn._linear_pointwise(x, gate, None, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, g, up, None, "mul")


# NOTE: the row count oneDNN lays the weight out for; any count works. Measured on an AMX
# Xeon (bf16, 2 threads, SmolLM2's shapes), packed for 64 vs F.linear: 1 row 27-66 vs 58-128 us,
# 64 rows 62-145 vs 90-234 us, 256 rows 142-395 vs 186-523 us; the hint (1, 64, 256) moved
# little. float32 gained nothing, so only bfloat16 weights are packed.
_PACK_BATCH_HINT = 64

# NOTE: int8 linears whose bf16 weight is kept too (prepacked): calls of up to this many rows
# (decode batches) run int8 on torch._int_mm, larger ones (prefill) bf16. Measured on the
# 2-core AMX Xeon at SmolLM2's shapes, int8 over bf16: 2.4x/2.4x/1.6x (qkv, gate_up, down)
# at 64 rows; at 256, 1.5x, 0.84x, 2.3x; at 2,048, 0.75x, 0.72x, 1.6x.
INT8_MAX_ROWS = int(os.environ.get("SCALELLM_INT8_MAX_ROWS", "128"))

# NOTE: calls of up to this many rows run on a linear's 4-bit copy (`set_int4`), larger ones
# on its bf16 weight. Per layer of SmolLM2 on the 2-core AMX Xeon, hot caches, the int4 GEMM
# against the prepacked bf16 one: 1 row 98 vs 140 us, 2 rows 127 vs 175, 4 rows 176 vs 205,
# 8 rows 347 vs 142 (qkv, o, gate_up, down).
INT4_MAX_ROWS = int(os.environ.get("SCALELLM_INT4_MAX_ROWS", "8"))


def int8_rows_backend() -> Int8Backend | None:
    """The int8-rows chain's GEMM: the AMX kernel where it loads (SCALELLM_NO_AMX_GEMM=1: not),
    else oneDNN's int8 linear where it runs natively (None: Int8Weight's own), else our VNNI
    GEMM or torch._int_mm (layers/int_mm_backend.py)."""
    amx = amx_gemm.int8_backend()
    if amx is not None:
        return amx
    return None if qlinear_fast() else IntMmInt8Backend()


class LinearBase(nn.Module):
    qweight: Int8Weight | None = None  # set by set_int8(): the matmul runs in int8, `weight` is freed
    weight32: torch.Tensor | None = None  # set by set_fp32_compute(): bf16 values held as float32
    packed: PackedWeight | None = None  # set by set_packed(): `pack_bf16`'s layout, `weight` is freed
    fp8: Fp8Weight | None = None  # set by set_fp8(): the matmul runs in fp8 (quant/fp8.py), `weight` is freed
    int4: Int4Weight | None = None  # set by set_int4(): calls of up to INT4_MAX_ROWS rows run on it
    # set by set_packed(): `packed` when it is our kernels' layout and the only form
    own_only: OwnWeight | None = None
    bias32: torch.Tensor | None = None  # with own_only: the bias in float32, converted once
    # set by a model's int8-rows wiring (layers/int8_rows.py): with a bias-free oneDNN int8
    # weight, forward returns ScaledRows, the consumer applying the row scale
    rows_out: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded)

    def set_int8(self, act_amax: torch.Tensor | None = None, keep_weight: bool = False, onednn: bool = False) -> int:
        """Quantise the loaded weight to int8 (quant/int8.py), smoothed by the calibrated max
        |input| per channel when given; returns the bytes freed. keep_weight: keep the bf16
        weight too (then `set_packed`): calls of more than INT8_MAX_ROWS rows run on it.
        onednn: for oneDNN's int8 GEMM, every call (the int8-rows chain)."""
        before = self.weight.numel() * self.weight.element_size()
        self.qweight = Int8Weight(self.weight, act_amax, onednn_parts=self._onednn_parts() if onednn else 0,
                                  backend=int8_rows_backend() if onednn else None)
        if keep_weight:
            return -self.qweight.nbytes
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)
        return before - self.qweight.nbytes

    def set_fp8(self) -> int:
        """Quantise the loaded weight to fp8 e4m3 (quant/fp8.py); returns the bytes freed. A
        weight whose dimensions are not multiples of 16 (what the fp8 GEMM needs) stays as it is."""
        if self.in_features % 16 or self.out_features % 16:
            return 0
        before = self.weight.numel() * self.weight.element_size()
        self.fp8 = Fp8Weight(self.weight)
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device),
                                   requires_grad=False)
        return before - self.fp8.nbytes

    def set_fp32_compute(self) -> int:
        """For CPUs without bf16 units (where torch's bf16 GEMM is emulated, ~8x slower than
        fp32): hold the bf16 weight's exact values as float32 and run the GEMM in float32 on the
        bf16 input, rounding the output to bf16. That is a bf16 GEMM with float32 accumulation,
        the arithmetic bf16 hardware does, at float32 speed. Returns the bytes added."""
        before = self.weight.numel() * self.weight.element_size()
        self.weight32 = self.weight.detach().float()
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)
        return self.weight32.numel() * 4 - before

    def set_int4(self) -> int:
        """Keep a 4-bit copy of the bf16 weight (quant/int4.py) for calls of up to INT4_MAX_ROWS
        rows (decode steps of a few sequences: memory-bound, a quarter of the bytes); the weight
        stays for larger calls. Returns the bytes added (0 where the kernel does not take it)."""
        if self.int4 is not None or self.qweight is not None or not int4_supports(self.weight):
            return 0
        self.int4 = Int4Weight(self.weight)
        return self.int4.nbytes

    def _on_int4(self, x: torch.Tensor | Int8Rows) -> bool:
        return (self.int4 is not None and isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16
                and x.numel() <= INT4_MAX_ROWS * x.shape[-1])

    def _int4_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        assert self.int4 is not None
        y = self.int4.mm(x.reshape(-1, x.shape[-1]))
        if bias is not None:
            y = y + bias
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    def set_packed(self) -> int:
        """For CPUs with bf16 units: hold the weight prepacked once, in AMX tiles for the AMX
        GEMM where it runs (1.3-2.3x oneDNN at decode sizes), else in blocks for our AVX-512
        BF16 GEMM where that runs (layers/bf16_gemm.py), else in oneDNN's blocked layout
        (F.linear re-lays it out per call: 1.2-2x slower). Returns the bytes added."""
        before = self.weight.numel() * self.weight.element_size()
        self._pack()
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)
        # every call on our kernel's weight (no int4, int8 or fp8 form beside it): matmul's first line
        plain = self.int4 is None and self.qweight is None and self.fp8 is None and self.weight32 is None
        self.own_only = self.packed if plain and isinstance(self.packed, OwnWeight) else None
        if self.own_only is not None and self.bias is not None:
            self.bias32 = self.bias.detach().float().contiguous()  # what the kernel's epilogue adds
        return self._packed_nbytes() - before

    def _pack(self) -> None:
        self.packed = pack_bf16(self.weight)

    def _packed_nbytes(self) -> int:
        return packed_nbytes(self.packed)

    def _onednn_parts(self) -> int:
        return 1

    def int8_gemm(self, x: torch.Tensor | Int8Rows) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (quantised here unless it is int8 rows already) through oneDNN's int8 GEMM (this
        linear holds a oneDNN int8 weight) -> (the parts' outputs, the row scales they still need)."""
        qw = self.qweight
        assert qw is not None and qw.onednn is not None
        rows = x if isinstance(x, Int8Rows) else quantise(x.reshape(-1, x.shape[-1]), qw.inv_smooth)
        return qw.gemm(rows.codes, self.weight.dtype), rows.scales  # (the freed weight keeps its dtype)

    def matmul(self, x: torch.Tensor | Int8Rows, bias: torch.Tensor | None) -> torch.Tensor | ScaledRows:
        """x @ W.T (+ bias). With a oneDNN int8 weight x may be int8 rows, and when wired
        (`rows_out`) the output is ScaledRows, its row scales left to the consumer."""
        if self.own_only is not None and type(x) is torch.Tensor:
            return linear_packed(x, self.own_only, self.bias32 if bias is self.bias else bias)
        if self._on_int4(x):
            assert isinstance(x, torch.Tensor)
            return self._int4_matmul(x, bias)
        qw = self.qweight
        if qw is not None and qw.onednn is not None:
            parts, scales = self.int8_gemm(x)
            rows_y = ScaledRows(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1), scales)
            if self.rows_out and bias is None:
                return rows_y
            dense = rows_y.dense(bias)
            return dense if isinstance(x, Int8Rows) else dense.view(*x.shape[:-1], dense.shape[-1])
        assert isinstance(x, torch.Tensor)
        if self.fp8 is not None:
            return self.fp8(x, bias)
        if qw is not None and (self.packed is None or x.numel() <= INT8_MAX_ROWS * x.shape[-1]):
            if qw.q is not None and x.dim() == 2 and x.is_contiguous() and fused_cpu.supports(x):
                return fused_cpu.int8_rows(x, qw.inv_smooth, qw.q, qw.w_scales, bias)
            return qw(x, bias)
        if self.packed is not None:
            return linear_packed(x, self.packed, bias)
        if self.weight32 is not None:
            y = F.linear(x.float(), self.weight32, None if bias is None else bias.float())
            return y.to(x.dtype)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor | Int8Rows) -> torch.Tensor | ScaledRows:
        return self.matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole matrix."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication in forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        tp = get_parallel_state()
        if out_features % tp.tp_size:
            raise ModelLoadError(f"output size {out_features} is not divisible by tensor-parallel size {tp.tp_size}")
        self.tp_rank, self.tp_size = tp.tp_rank, tp.tp_size
        super().__init__(in_features, out_features // tp.tp_size, bias, dtype)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        shard = loaded.narrow(0, self.tp_rank * size, size)
        _check_shape(param, shard, "column-parallel weight")
        param.data.copy_(shard)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices (e.g. gate and up) stacked into one GEMM."""

    # set by set_packed() for a bias-free [gate | up] pair: each half in oneDNN's layout
    packed_halves: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, dtype: torch.dtype | None = None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype)

    @property
    def gate_up(self) -> bool:
        """A bias-free pair of halves ([gate | up]): `silu_and_mul` applies."""
        return len(self.output_sizes) == 2 and self.bias is None

    def _pack(self) -> None:
        """A [gate | up] pair is packed for `silu_and_mul`: as AMX tiles in (gate, up) block
        pairs, for our AVX-512 BF16 GEMM whole (its SwiGLU call pairs the halves' blocks), else
        half by half in oneDNN's layout."""
        if self.gate_up and amx_takes(self.weight):
            self.packed = amx_gemm.pack(self.weight, swiglu=True)
        elif not self.gate_up or bf16_gemm.takes(self.weight):
            super()._pack()
        else:
            gate, up = self.weight.detach().split(self.weight.shape[0] // 2)
            self.packed_halves = (pack_onednn(gate.contiguous()), pack_onednn(up.contiguous()))

    def _packed_nbytes(self) -> int:
        if self.packed_halves is None:
            return super()._packed_nbytes()
        return sum(p.numel() * p.element_size() for p in self.packed_halves)

    # set by a model's int8-rows wiring: silu_and_mul on int8 rows returns int8 rows for the
    # next linear (`down`), whose input smoothing (or None) this is
    silu_rows_smooth: torch.Tensor | None = None
    silu_rows_out: bool = False

    def _onednn_parts(self) -> int:
        return 2 if self.gate_up else 1

    def _on_bf16(self, x: torch.Tensor) -> bool:
        # an int8 weight (kept with the bf16 one) serves calls of up to INT8_MAX_ROWS rows
        return self.qweight is None or x.numel() > INT8_MAX_ROWS * x.shape[-1]

    def _on_halves(self, x: torch.Tensor) -> bool:
        return self.packed_halves is not None and self._on_bf16(x)

    def matmul(self, x: torch.Tensor | Int8Rows, bias: torch.Tensor | None) -> torch.Tensor | ScaledRows:
        if isinstance(x, torch.Tensor) and self._on_halves(x) and not self._on_int4(x):
            assert self.packed_halves is not None
            return torch.cat([linear_packed(x, half, None) for half in self.packed_halves], dim=-1)
        return super().matmul(x, bias)

    def silu_and_mul(self, x: torch.Tensor | Int8Rows) -> torch.Tensor | Int8Rows | None:
        """silu(gate) * up of this [gate | up] projection of x [T, K], fused into the GEMMs
        (`silu_mul_packed`; with float32 weights standing in for bf16 ones, the same roundings);
        None where this linear has no such path (then: act(self(x))).
        NOTE: at SmolLM2's MLP on the 2-core AMX Xeon, 4,096 rows: 5.96 ms against 7.53 ms for
        the merged GEMM + the numba SiLU-mul pass; 64 rows: 0.179 against 0.216 ms."""
        if self.gate_up and self.qweight is not None and self.qweight.onednn is not None:
            return self._silu_and_mul_int8(x) if isinstance(x, Int8Rows) or x.dim() == 2 else None
        assert isinstance(x, torch.Tensor)  # (int8 rows come only to a oneDNN int8 pair)
        if x.dim() != 2 or self._on_int4(x):
            return None  # (the 4-bit GEMM, then the SiLU-mul pass)
        if isinstance(self.packed, AmxWeight) and self._on_bf16(x):
            return amx_gemm.silu_mul(x, self.packed)
        if (isinstance(self.packed, Bf16Blocks) and self.gate_up and bf16_gemm.takes_swiglu(self.packed)
                and self._on_bf16(x)):
            return bf16_gemm.silu_mul(x, self.packed)
        if self._on_halves(x):
            assert self.packed_halves is not None
            return silu_mul_packed(x, *self.packed_halves)
        if self.weight32 is not None and self.qweight is None and self.gate_up:
            # no bf16 units: the same arithmetic in float32 (the gate rounded once, then the product)
            gate, up = F.linear(x.float(), self.weight32).chunk(2, dim=-1)
            return (F.silu(gate).to(x.dtype).float() * up).to(x.dtype)
        return None

    def _silu_and_mul_int8(self, x: torch.Tensor | Int8Rows) -> torch.Tensor | Int8Rows:
        # oneDNN int8 halves: [gate, up] with their row scales still to apply; SiLU-mul applies
        # them (and, wired, quantises for down)
        (gate, up), scales = self.int8_gemm(x)
        if self.silu_rows_out and fused_cpu.supports(gate):
            return Int8Rows(*fused_cpu.silu_mul_quant(gate, up, scales, self.silu_rows_smooth))
        # the row scales applied in float32, not rounded to gate's dtype first (as silu_mul_quant):
        # rounding the scaled gate and up costs ~1 point of perplexity on SmolLM2 (int8 with the
        # numba kernels off: +2.1% against bf16, +0.7% with them), enough to flip near-tied greedy
        # tokens while the kernels are still loading after start-up
        s = scales.unsqueeze(1)
        return (F.silu(gate.float() * s) * (up.float() * s)).to(gate.dtype)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if not isinstance(shard_id, int):
            raise ModelLoadError("merged linear needs an integer shard id")
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        target = param.data.narrow(0, offset, size)
        shard = loaded.narrow(0, self.tp_rank * size, size)
        _check_shape(target, shard, f"merged shard {shard_id}")
        target.copy_(shard)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one GEMM. KV heads are replicated when fewer than ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        tp_size = get_parallel_state().tp_size
        if num_heads % tp_size:
            raise ModelLoadError(f"{num_heads} attention heads are not divisible by tensor-parallel size {tp_size}")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        if num_kv_heads >= tp_size:
            if num_kv_heads % tp_size:
                raise ModelLoadError(f"{num_kv_heads} KV heads are not divisible by tensor-parallel size {tp_size}")
            self.num_kv_heads = num_kv_heads // tp_size
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = tp_size // num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias, dtype)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        d = self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp_rank * q_size
        elif shard_id == "k":
            offset, size, start = q_size, kv_size, (self.tp_rank // self.kv_replicas) * kv_size
        elif shard_id == "v":
            offset, size, start = q_size + kv_size, kv_size, (self.tp_rank // self.kv_replicas) * kv_size
        else:
            raise ModelLoadError(f"QKV linear needs shard id 'q', 'k' or 'v', got {shard_id!r}")
        target = param.data.narrow(0, offset, size)
        shard = loaded.narrow(0, start, size)
        _check_shape(target, shard, f"qkv shard {shard_id}")
        target.copy_(shard)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed (all-reduce)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        tp = get_parallel_state()
        if in_features % tp.tp_size:
            raise ModelLoadError(f"input size {in_features} is not divisible by tensor-parallel size {tp.tp_size}")
        self.tp_rank, self.tp_size = tp.tp_rank, tp.tp_size
        super().__init__(in_features // tp.tp_size, out_features, bias, dtype)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias: added once, after the reduction
            _check_shape(param, loaded, "row-parallel bias")
            param.data.copy_(loaded)
            return
        size = param.shape[1]
        shard = loaded.narrow(1, self.tp_rank * size, size)
        _check_shape(param, shard, "row-parallel weight")
        param.data.copy_(shard)

    def forward(self, x: torch.Tensor | Int8Rows) -> torch.Tensor | ScaledRows:
        if self.tp_size == 1:
            return self.matmul(x, self.bias)
        out = self.matmul(x, None)  # (one rank only wires int8 rows: a dense partial sum here)
        assert isinstance(out, torch.Tensor)
        out = tensor_parallel_all_reduce(out)
        return out + self.bias if self.bias is not None else out
