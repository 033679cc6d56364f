"""fp8 linears (W8A8, e4m3) on `torch._scaled_mm`: Hopper's fp8 tensor cores on GPU.

Weights are quantised once at load time: float8_e4m3fn, one scale per output channel
(max |w| of the row maps to 448, e4m3's largest finite value). Activations are
quantised at every call, one scale per token (its max |x|), in the same pass the GEMM
reads them; `_scaled_mm` applies both scales to its float32 accumulators and writes
the model's dtype:

    y[t, n] = sx[t] * sw[n] * sum_k q(x[t, k] / sx[t]) q(w[n, k] / sw[n]) + b[n]

Half the weight bytes of bf16 (decode reads every weight once per step, so decode steps
are up to ~2x faster where weights dominate) and twice the dense tensor-core rate for
prefill. The LM head stays in the model's dtype (its re-scored logits keep greedy
exact), and so do embeddings, norms and MoE experts.

`_scaled_mm` also runs on CPU in torch >= 2.7 (slowly), which is how CI checks the
numerics without a GPU. What this module does NOT know: models or sharding.
"""

from __future__ import annotations

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


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], float32 scales [M, 1]) with x ~ q * scale per row."""
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
