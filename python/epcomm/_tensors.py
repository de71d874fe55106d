"""How torch tensors and streams are described to epcomm._C (see python/bindings/tensor_bridge.hpp).

A tensor crosses as ``(data_ptr, dtype code, shape, strides, device type, device index)``; epcomm never
takes ownership of an input, so the caller keeps the tensor alive for the duration of the call (and,
for asynchronous work, until the work finishes: see buffer.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _C
from ._errors import invalid_argument

#: torch dtype -> epcomm::DType code, for the dtypes epcomm moves.
DTYPE_CODES = {getattr(torch, name): code for name, code in _C.dtype_codes.items()}
#: epcomm::DType code -> torch dtype.
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}

_DEVICE_CODES = {"cpu": 0, "cuda": 1}
_MAX_DIMS = 4

TensorDescription = Tuple[int, int, Tuple[int, ...], Tuple[int, ...], int, int]


def describe(tensor: torch.Tensor, op: str, arg: str) -> TensorDescription:
    """The description of ``tensor`` epcomm._C reads; errors name ``op`` and ``arg``."""
    if not isinstance(tensor, torch.Tensor):
        raise invalid_argument(op, arg, f"expected a torch.Tensor, got {type(tensor).__name__}")
    code = DTYPE_CODES.get(tensor.dtype)
    if code is None:
        names = ", ".join(str(d) for d in DTYPE_CODES)
        raise invalid_argument(op, arg, f"dtype {tensor.dtype} is not supported (epcomm moves {names})")
    device_code = _DEVICE_CODES.get(tensor.device.type)
    if device_code is None:
        raise invalid_argument(op, arg, f"expected a CPU or CUDA tensor, got one on {tensor.device}")
    if tensor.dim() > _MAX_DIMS:
        raise invalid_argument(op, arg, f"expected at most {_MAX_DIMS} dims, got {tensor.dim()} ({list(tensor.shape)})")
    index = tensor.device.index if device_code == 1 else 0
    return (tensor.data_ptr(), code, tuple(tensor.shape), tuple(tensor.stride()), device_code, index or 0)


def describe_optional(tensor: Optional[torch.Tensor], op: str, arg: str) -> Optional[TensorDescription]:
    return None if tensor is None else describe(tensor, op, arg)


def current_stream_handle(device: torch.device) -> int:
    """The caller's current stream on ``device`` as a cudaStream_t integer (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def is_capturing(device: torch.device) -> bool:
    """True while the current stream of ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
