"""numpy arrays for numba kernels, made cheaply from torch tensors and for their outputs.

A numba kernel takes numpy arrays, so each call converts its tensors (`Tensor.numpy()`;
bfloat16 through an int16 view of its raw bits: numba has no bfloat16) and allocates its
outputs. At a decode step's sizes a kernel runs for a few microseconds, and that glue cost
more than the kernel: measured on the 2-core AMX Xeon, the quantising RMSNorm at 1 row took
19.6 us a call, 2.8 us of it the kernel with its arrays ready (~150 such calls a decode step
of SmolLM2). Here:

- `empty`: an output allocated by numpy and wrapped for torch (`torch.from_numpy`), ~1 us
  less than `torch.empty` then `.numpy()`;
- `const_bits`: the view of a long-lived tensor (a weight, a smoothing vector, a KV cache)
  made once and kept on the tensor, checked against its data pointer at each use.

Knows nothing of models: tensors in, arrays out.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_NUMPY_DTYPES = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.int8: np.int8,
                 torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64, torch.float64: np.float64}
_KEY = "_scalellm_numpy"  # the tensor attribute holding its cached views: {shape or None: (data_ptr, array)}


def bits(t: torch.Tensor) -> np.ndarray:
    """A numpy view of t (C-order as t is): bfloat16 as its raw bits (int16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def const_bits(t: torch.Tensor, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """`bits(t)` (reshaped to `shape`, if given) for a tensor whose data stays where it is (a
    weight, a cache): made on the first call and kept on t; made again if t's data moved
    (`param.data = ...`). For a tensor used once (a step's activations) it only costs: use
    `bits`."""
    views = t.__dict__.get(_KEY)
    if views is not None:
        hit = views.get(shape)
        if hit is not None and hit[0] == t.data_ptr():
            return hit[1]
    else:
        views = {}
        setattr(t, _KEY, views)
    array = bits(t)
    if shape is not None:
        array = array.reshape(shape)
    views[shape] = (t.data_ptr(), array)
    return array


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A new uninitialised tensor of `dtype` and its numpy view (int16 for bfloat16)."""
    array = np.empty(shape, dtype=_NUMPY_DTYPES[dtype])
    tensor = torch.from_numpy(array)
    return (tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor), array


_scratch: dict[tuple[int, int, int], np.ndarray] = {}


def scratch(rows: int, width: int) -> np.ndarray:
    """A float32 [rows, width] work array kept for reuse by the calling thread (a kernel's
    per-worker row buffers: rows = numba's thread count)."""
    key = (rows, width, threading.get_ident())
    array = _scratch.get(key)
    if array is None:
        array = _scratch[key] = np.empty((rows, width), dtype=np.float32)
    return array
