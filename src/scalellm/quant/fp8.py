"""fp8 linears (W8A8, e4m3) on `torch._scaled_mm`: Hopper's fp8 tensor cores on GPU.

Weights are quantised once at load time: float8_e4m3fn, one scale per output channel
(max |w| of the row maps to 448, e4m3's largest finite value). Activations are
quantised at every call, one scale per token (its max |x|), in the same pass the GEMM
reads them; `_scaled_mm` applies both scales to its float32 accumulators and writes
the model's dtype:

    y[t, n] = sx[t] * sw[n] * sum_k q(x[t, k] / sx[t]) q(w[n, k] / sw[n]) + b[n]

Before quantising, a SmoothQuant-style per-input-channel factor c moves activation
outliers into the weights of every linear fed by an RMSNorm alone (QKV, gate/up): the
norm's weight is divided by c and the linear's columns multiplied by it, so the float
model is unchanged and nothing runs at serving time (`smooth_into_norm`):

    c_j = max|x_j|^alpha / max|W_j|^(1 - alpha)      alpha = 0.5, max|x_j| calibrated

Half the weight bytes of bf16 (decode reads every weight once per step, so decode steps
are up to ~2x faster where weights dominate) and twice the dense tensor-core rate for
prefill. The LM head stays in the model's dtype (its re-scored logits keep greedy
exact), and so do embeddings, norms and MoE experts.

`_scaled_mm` also runs on CPU in torch >= 2.7 (slowly), which is how CI checks the
numerics without a GPU. What this module does NOT know: models or sharding.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def fp8_available(device: torch.device) -> bool:
    """Whether `_scaled_mm` with per-row scales runs here (compute capability 8.9+ on GPU)."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


def _fused(x: torch.Tensor) -> bool:
    """Whether the one-pass Triton quantiser runs for x (GPU, or Triton's interpreter)."""
    on = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on and x.dim() == 2 and x.stride(1) == 1 and x.dtype != torch.float32 and _has_triton()


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def smooth_into_norm(norm_weight: torch.Tensor, weight: torch.Tensor, act_amax: torch.Tensor,
                     alpha: float = 0.5) -> None:
    """In place: norm_weight [K] /= c and weight [N, K] *= c (columns), with c from the
    calibrated max |input| per channel (act_amax [K]) and the weight's per-column max."""
    w = weight.detach().float()
    w_amax = w.abs().amax(dim=0).clamp(min=1e-5)  # [K]
    c = (act_amax.float().to(w.device).clamp(min=1e-5) ** alpha / w_amax ** (1 - alpha)).clamp(min=1e-5)
    weight.data.copy_(w * c)
    norm_weight.data.copy_(norm_weight.detach().float() / c)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], float32 scales [M, 1]) with x ~ q * scale per row. On GPU
    one Triton pass (max |x|, scale, cast), where the torch ops take five kernels."""
    if _fused(x):
        m, n = x.shape
        q = torch.empty(m, n, dtype=FP8, device=x.device)
        s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
        if m:
            from scalellm.quant._triton_fp8 import _quant_fp8_kernel  # triton only where it runs

            _quant_fp8_kernel[(m,)](x, q, s, n, x.stride(0), q.stride(0), FMAX=FP8_MAX,
                                    CH=min(1024, 1 << max(0, n - 1).bit_length()), num_warps=4)
        return q, s
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Weight:
    """An e4m3 weight [N, K] with one float32 scale per output channel, and its matmul."""

    __slots__ = ("qweight", "scale", "out_dtype", "nbytes", "in_features", "out_features")

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach()
        self.out_features, self.in_features = w.shape
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"fp8 needs both dimensions divisible by 16, got {tuple(w.shape)}")
        q, scale = quantize_rows(w)
        self.qweight = q  # [N, K] row-major, so qweight.t() is the column-major operand _scaled_mm wants
        self.scale = scale.view(1, -1).contiguous()  # [1, N]
        self.out_dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        self.nbytes = q.numel() + self.scale.numel() * 4

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, sx = quantize_rows(x2)
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=sx, scale_b=self.scale, out_dtype=self.out_dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        y = y.to(x.dtype)
        return y if len(shape) == 2 else y.view(*shape[:-1], y.shape[-1])
