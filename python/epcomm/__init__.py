"""epcomm: expert-parallel communication for Mixture-of-Experts, call-compatible with DeepEP V1.

    import epcomm as deep_ep        # or: epcomm.install_as_deep_ep(); import deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes=...)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(x, ...)

The CUDA backend runs whenever CUDA is available, the CPU backend otherwise or when asked for
(``Buffer(..., backend="cpu")``, ``$EPCOMM_BACKEND``); the group only bootstraps (see ``Buffer``).
"""
import torch  # first: loads the CUDA runtime libepcomm links against, when torch has one

from . import _C
from ._C import (BufferFailed, Error, InternalError, InvalidArgumentError, OutOfCapacityError, PeerFailureError, TimeoutError,
                 UnsupportedError)
from ._deep_ep_alias import install_as_deep_ep
from .buffer import Buffer, DispatchHandle
from .config import Config
from .event import EventHandle, EventOverlap
from . import utils  # noqa: E402 - deep_ep.utils

#: The default dtype of expert indices (topk_idx); int32 is accepted too.
topk_idx_t = torch.int64

__version__ = _C.__version__
__all__ = [
    "Buffer", "Config", "EventOverlap", "EventHandle", "DispatchHandle", "topk_idx_t", "Error", "InvalidArgumentError",
    "UnsupportedError", "TimeoutError", "PeerFailureError", "OutOfCapacityError", "InternalError",
    "BufferFailed", "install_as_deep_ep", "utils",
]
